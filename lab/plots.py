"""The figures of ``kmstn bench``: PNGs of the paper's Figs. 4-8 (section VI).

Each benchmark keeps its raw samples (``samples`` in its JSON) and this
module draws them next to the CSV and JSON, with matplotlib's Agg backend
(no display needed):

========================  ===========  =============================================
file                      paper        what
========================  ===========  =============================================
keyrate.png               Fig. 4       per-request keyrate, one box per pair, a panel
                                       per master KMSTN
delay.png                 Fig. 5       distribution of enc_keys latency per pair
delay_over_time.png       Fig. 6       latency over time: rolling mean of 4, +- std
concurrency.png           Fig. 7       latency of simultaneous requests over time,
                                       failures in red
correlation.png           Fig. 8       correlation matrix of the per-pair variables
                                       the keyrate run has
scarcity.png              Fig. 7       latency spread of simultaneous requests that find
                                       the device stores empty (waits, issue 11)
scarcity_over_time.png    Fig. 7       the same as concurrency.png draws it
fairness.png              --           delivered bits per SAE over time, per phase,
                                       with Jain's index (issue 11)
========================  ===========  =============================================

Every axis says its unit; every title names the pair (or the master) and
the setup (federation name and QKD rate scale).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

# The backend is chosen before pyplot is imported.
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["figures", "main", "rolling"]

DPI = 110
FAIL = "#d62728"
OK = "#1f77b4"


def rolling(values: Sequence[float], window: int = 4) -> tuple[list[float], list[float]]:
    """Mean and population std over a sliding window ending at each point (>= window)."""
    means, stds = [], []
    for i in range(window, len(values) + 1):
        chunk = values[i - window:i]
        means.append(statistics.fmean(chunk))
        stds.append(statistics.pstdev(chunk))
    return means, stds


def _setup(meta: Mapping[str, Any]) -> str:
    return f"{meta.get('federation', '?')}, QKD rate x{meta.get('qkd_rate_scale', 1):g}"


def _grid(n: int, cols: int = 3, size: tuple[float, float] = (4.6, 3.2)) -> tuple[Any, Any]:
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _save(fig: Any, path: Path) -> Path:
    # Leave room for a figure title above the panels' own titles.
    fig.tight_layout(rect=(0, 0, 1, 0.96) if fig.get_suptitle() else None)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _keyrate(samples: Mapping[str, Any], meta: Mapping[str, Any], out: Path) -> Path:
    by_master: dict[str, list[tuple[str, list[float]]]] = {}
    for pair, s in samples.items():
        master, slave = pair.split("->")
        by_master.setdefault(master, []).append((slave, s["rates_bps"]))
    fig, axes = _grid(len(by_master), cols=2, size=(6.4, 3.6))
    for ax, (master, pairs) in zip(axes, sorted(by_master.items()), strict=False):
        pairs.sort()
        ax.boxplot([r for _, r in pairs], tick_labels=[s for s, _ in pairs], showfliers=True,
                   flierprops={"markersize": 3})
        ax.set_yscale("log")
        ax.set_title(f"master {master}: keyrate per request")
        ax.set_xlabel("slave SAE")
        ax.set_ylabel("keyrate (bit/s)")
        ax.tick_params(axis="x", labelrotation=45)
    fig.suptitle(f"Keyrate distribution per pair (paper Fig. 4); 256-bit keys, "
                 f"{_setup(meta)}")
    return _save(fig, out / "keyrate.png")


def _delay(samples: Mapping[str, Any], meta: Mapping[str, Any], out: Path) -> Path:
    fig, axes = _grid(len(samples))
    for ax, (pair, s) in zip(axes, samples.items(), strict=False):
        enc, avail = s["enc_keys_ms"], s["enc_to_available_ms"]
        top = max(max(enc), max(avail))
        bins = np.linspace(0, top * 1.02, 30)
        ax.hist(enc, bins=bins, alpha=0.7, label="enc_keys at master", color=OK)
        ax.hist(avail, bins=bins, alpha=0.5, label="until slave has it", color="#ff7f0e")
        ax.axvline(statistics.median(enc), color=OK, linestyle="--", linewidth=1)
        ax.set_title(f"{pair}: delay ({len(enc)} requests)")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests")
        ax.legend(fontsize=7)
    fig.suptitle(f"Delay distribution per pair (paper Fig. 5); dashed: median, "
                 f"{_setup(meta)}")
    return _save(fig, out / "delay.png")


def _delay_over_time(samples: Mapping[str, Any], meta: Mapping[str, Any], out: Path) -> Path:
    fig, axes = _grid(len(samples))
    for ax, (pair, s) in zip(axes, samples.items(), strict=False):
        t, enc = s["t_s"], s["enc_keys_ms"]
        ax.plot(t, enc, ".", color="#999999", markersize=3, label="each request")
        mean, std = rolling(enc)
        if mean:
            tt = t[3:]
            lo = [m - d for m, d in zip(mean, std, strict=True)]
            hi = [m + d for m, d in zip(mean, std, strict=True)]
            ax.plot(tt, mean, color=OK, label="rolling mean (4)")
            ax.fill_between(tt, lo, hi, color=OK, alpha=0.25, label="+- 1 std")
        ax.set_title(f"{pair}: enc_keys latency over time")
        ax.set_xlabel("time since first request (s)")
        ax.set_ylabel("latency (ms)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Latency over time (paper Fig. 6); window of 4 requests, {_setup(meta)}")
    return _save(fig, out / "delay_over_time.png")


def _concurrency(samples: Mapping[str, Any], meta: Mapping[str, Any], out: Path,
                 name: str = "concurrency", note: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.8))
    reqs = samples["requests"]
    ok = [r for r in reqs if r["status"] == 200]
    bad = [r for r in reqs if r["status"] != 200]
    ax.scatter([r["t_s"] for r in ok], [r["latency_ms"] for r in ok], s=9, color=OK,
               label=f"served ({len(ok)})")
    # Failures drawn last, so they stay visible over the served requests.
    ax.scatter([r["t_s"] for r in bad], [r["latency_ms"] for r in bad], s=14, color=FAIL,
               label=f"failed ({len(bad)})")
    ax.set_xlabel("time the request was sent, since the first round (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{samples['pair']}: {samples['concurrency']} simultaneous enc_keys per round, "
                 f"{samples['rounds']} rounds (paper Fig. 7)\n{note}{_setup(meta)}")
    ax.legend()
    return _save(fig, out / f"{name}.png")


def _scarcity(samples: Mapping[str, Any], meta: Mapping[str, Any], out: Path) -> Path:
    """Fig. 7 under scarcity: each round's latencies in order (the spread), failures red."""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    rounds = sorted({r["round"] for r in samples["requests"]})
    for rnd in rounds:
        reqs = sorted((r for r in samples["requests"] if r["round"] == rnd),
                      key=lambda r: r["latency_ms"])
        ranks = list(range(1, len(reqs) + 1))
        ax.plot(ranks, [r["latency_ms"] / 1000 for r in reqs], lw=1.2, label=f"round {rnd}")
        bad = [(i, r) for i, r in zip(ranks, reqs, strict=True) if r["status"] != 200]
        if bad:
            ax.scatter([i for i, _ in bad], [r["latency_ms"] / 1000 for _, r in bad], s=14,
                       color=FAIL, zorder=3)
    failed = sum(1 for r in samples["requests"] if r["status"] != 200)
    budget = samples.get("wait_budget_s", 0)
    ax.axhline(budget, color="grey", ls="--", lw=0.8, label=f"wait budget {budget:g} s")
    ax.set_xlabel("request, in order of its answer")
    ax.set_ylabel("latency (s)")
    ax.set_title(f"{samples['pair']}: {samples['concurrency']} simultaneous enc_keys, device "
                 f"stores empty at each round's start\n{failed} failed (red: 503 + Retry-After)"
                 f"; {_setup(meta)}")
    ax.legend()
    return _save(fig, out / "scarcity.png")


def _fairness(rows: Sequence[Mapping[str, Any]], samples: Mapping[str, Any],
              meta: Mapping[str, Any], out: Path) -> Path:
    phases = list(samples["phases"])
    fig, axes = _grid(len(phases), cols=len(phases), size=(6.0, 4.0))
    saes = [p.split("->")[0] for p in samples["pairs"]]
    for ax, phase in zip(axes, phases, strict=False):
        events = samples["phases"][phase]["events"]
        for sae in saes:
            # (when, SAE, bits): a greedy SAE takes several keys per request.
            got = sorted((e[0], e[2] if len(e) > 2 else 256) for e in events if e[1] == sae)
            total, kbits = 0, []
            for _, bits in got:
                total += bits
                kbits.append(total / 1000)
            ax.step([t for t, _ in got], kbits, where="post", label=sae)
        jain = next((r["jain_all"] for r in rows if r["phase"] == phase), float("nan"))
        greedy = next((r["sae"] for r in rows if r["phase"] == phase and r["greedy"]), None)
        ax.set_title(f"{phase}" + (f" ({greedy} greedy)" if greedy else "")
                     + f": Jain {jain:.3f}")
        ax.set_xlabel("time since the phase started (s)")
        ax.set_ylabel("key delivered (kbit)")
        ax.legend()
    fig.suptitle(f"SAEs competing for one QKD link, {samples['seconds']:g} s per phase\n"
                 f"{_setup(meta)}")
    return _save(fig, out / "fairness.png")


def _correlation(rows: Sequence[Mapping[str, Any]], samples: Mapping[str, Any],
                 meta: Mapping[str, Any], out: Path) -> Path | None:
    """The variables the keyrate run has, per pair (the paper varied concurrency and
    the number of keys too; a run that does not vary them cannot correlate them)."""
    names = {"hops": "hops", "qkd": "QKD hops", "allowed": "rate QKD allows (bit/s)",
             "mean": "mean keyrate (bit/s)", "p95": "p95 keyrate (bit/s)",
             "std": "keyrate std (bit/s)", "lat50": "latency p50 (ms)",
             "lat95": "latency p95 (ms)"}
    table: dict[str, list[float]] = {k: [] for k in names}
    for row in rows:
        s = samples.get(row["pair"])
        if not s or len(s["rates_bps"]) < 2:
            continue
        rates, lat = s["rates_bps"], s["latency_ms"]
        q = statistics.quantiles
        table["hops"].append(row["hops"])
        table["qkd"].append(str(row["path"]).split("-").count("qkd"))
        table["allowed"].append(row["allowed_bps"])
        table["mean"].append(row["rate_mean_bps"])
        table["p95"].append(q(rates, n=20, method="inclusive")[18])
        table["std"].append(row["rate_std_bps"])
        table["lat50"].append(statistics.median(lat))
        table["lat95"].append(q(lat, n=20, method="inclusive")[18])
    keys = [k for k, v in table.items()
            if len(v) >= 3 and all(math.isfinite(x) for x in v) and len(set(v)) > 1]
    if len(keys) < 2:
        return None
    corr = np.corrcoef(np.array([table[k] for k in keys]))
    labels = [names[k] for k in keys]
    fig, ax = plt.subplots(figsize=(8.4, 7.0))
    im = ax.imshow(corr, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(corr[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="Pearson correlation (unitless)")
    ax.set_title(f"Correlations over {len(table['hops'])} pairs of the keyrate run "
                 f"(paper Fig. 8)\n{_setup(meta)}")
    return _save(fig, out / "correlation.png")


def figures(name: str, rows: Sequence[Mapping[str, Any]], samples: Any,
            meta: Mapping[str, Any], out: Path) -> list[Path]:
    """Draw the PNGs of one benchmark's results; returns the files written."""
    if not samples:
        return []
    out.mkdir(parents=True, exist_ok=True)
    if name == "keyrate":
        made = [_keyrate(samples, meta, out), _correlation(rows, samples, meta, out)]
        return [p for p in made if p is not None]
    if name == "delay":
        return [_delay(samples, meta, out), _delay_over_time(samples, meta, out)]
    if name == "concurrency":
        return [_concurrency(samples, meta, out)]
    if name == "scarcity":
        note = (f"device stores empty at each round's start, wait budget "
                f"{samples.get('wait_budget_s', 0):g} s; ")
        return [_scarcity(samples, meta, out),
                _concurrency(samples, meta, out, "scarcity_over_time", note)]
    if name == "fairness":
        return [_fairness(rows, samples, meta, out)]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lab.plots DIR``: draw the figures again from DIR's <name>.json files."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m lab.plots")
    parser.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    for name in ("keyrate", "delay", "concurrency", "scarcity", "fairness"):
        path = args.dir / f"{name}.json"
        if path.exists():
            doc = json.loads(path.read_text())
            for png in figures(name, doc["rows"], doc.get("samples"), doc, args.dir):
                print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
