"""lab/plots.py: every figure of `kmstn bench` is written from a benchmark's samples."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lab.plots import figures, rolling

META = {"federation": "paper-testbed", "qkd_rate_scale": 10.0}
PNG = b"\x89PNG\r\n\x1a\n"


def test_rolling_mean_and_std_over_four() -> None:
    mean, std = rolling([1.0, 1.0, 1.0, 5.0, 5.0])
    assert mean == [2.0, 3.0] and std == pytest.approx([1.7320508, 2.0])
    assert rolling([1.0, 2.0]) == ([], [])


def _keyrate(rng: random.Random) -> tuple[list[dict[str, object]], dict[str, object]]:
    rows, samples = [], {}
    for master in ("SAE1", "SAE7"):
        for hops, slave in enumerate(("SAE2", "SAE3", "SAE8"), start=1):
            pair = f"{master}->{slave}"
            rates = [rng.lognormvariate(8 - hops * 0.3, 0.5) for _ in range(30)]
            samples[pair] = {"rates_bps": rates, "latency_ms": [256_000 / r for r in rates]}
            rows.append({"pair": pair, "hops": hops, "path": "-".join(["qkd", "pqc"][:hops]),
                         "allowed_bps": 2600.0 / hops, "rate_mean_bps": sum(rates) / 30,
                         "rate_std_bps": 1.0 + hops})
    return rows, samples


def test_every_figure_is_written(tmp_path: Path) -> None:
    rng = random.Random(13)
    rows, samples = _keyrate(rng)
    written = figures("keyrate", rows, samples, META, tmp_path)
    assert [p.name for p in written] == ["keyrate.png", "correlation.png"]
    delay = {f"SAE{i}->SAE{i + 1}": {"t_s": [j * 0.1 for j in range(20)],
                                    "enc_keys_ms": [rng.gammavariate(2, 10) for _ in range(20)],
                                    "enc_to_available_ms": [rng.gammavariate(2, 12)
                                                            for _ in range(20)]}
             for i in (1, 3, 5)}
    written += figures("delay", [], delay, META, tmp_path)
    conc = {"pair": "SAE1->SAE2", "concurrency": 10, "rounds": 2, "requests": [
        {"round": r, "t_s": r * 1.5, "status": 503 if i % 4 == 0 else 200,
         "latency_ms": rng.uniform(5, 50)} for r in (1, 2) for i in range(10)]}
    written += figures("concurrency", [], conc, META, tmp_path)
    assert [p.name for p in written] == ["keyrate.png", "correlation.png", "delay.png",
                                         "delay_over_time.png", "concurrency.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    assert figures("resources", [], [{"service": "x"}], META, tmp_path) == []


def test_no_correlation_without_variation(tmp_path: Path) -> None:
    rows, samples = _keyrate(random.Random(1))
    rows = rows[:2]  # two pairs: too few to correlate anything
    assert [p.name for p in figures("keyrate", rows, samples, META, tmp_path)] == [
        "keyrate.png"]
