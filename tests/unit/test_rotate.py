"""lab.rotate (``kmstn sae rotate``): retry and backoff, hand-off, both roles, with fakes.

The real thing against a live federation is in tests/integration/test_consumers.py.
"""

from __future__ import annotations

import base64
import os
import random
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.rotate import (
    Backoff,
    Consumer,
    Retry,
    RotateError,
    encode,
    rotate_master,
    rotate_slave,
    write_atomically,
)


class FakeKme:
    """Answers a scripted list of (status, body) or exceptions, then hands out keys."""

    def __init__(self, script: list[Any] | None = None) -> None:
        self.script = list(script or [])
        self.issued: dict[str, bytes] = {}
        self.calls: list[tuple[str, Any]] = []

    def _next(self) -> tuple[int, Any] | None:
        if not self.script:
            return None
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step  # type: ignore[no-any-return]

    def enc_keys(self, slave: str, number: int = 1, size: int | None = None,
                 additional: list[str] | None = None) -> tuple[int, Any]:
        self.calls.append(("enc_keys", slave))
        scripted = self._next()
        if scripted is not None:
            return scripted
        key_id, material = str(uuid.uuid4()), os.urandom((size or 256) // 8)
        self.issued[key_id] = material
        return 200, {"keys": [{"key_ID": key_id, "key": base64.b64encode(material).decode()}]}

    def dec_keys(self, master: str, key_ids: list[str]) -> tuple[int, Any]:
        self.calls.append(("dec_keys", master))
        scripted = self._next()
        if scripted is not None:
            return scripted
        (key_id,) = key_ids
        material = self.issued.pop(key_id, None)
        if material is None:
            return 400, {"message": "one or more keys specified are not found on KME"}
        return 200, {"keys": [{"key_ID": key_id, "key": base64.b64encode(material).decode()}]}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def retry(clock: Clock, log: list[str] | None = None, **kw: Any) -> Retry:
    return Retry(kw.pop("backoff", Backoff(jitter=0.0)), kw.pop("give_up_after", 300.0),
                 (log if log is not None else []).append, clock.sleep, lambda: clock.now,
                 random.Random(1))


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    plain = Backoff(first=0.5, max_delay=4.0, jitter=0.0).delays(random.Random(0))
    assert [next(plain) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    spread = Backoff(first=1.0, factor=1.0, jitter=0.2).delays(random.Random(0))
    values = [next(spread) for _ in range(200)]
    assert all(0.8 <= v <= 1.2 for v in values) and len(set(values)) > 100


def test_503_and_connection_failures_are_retried_then_answered(clock: Clock) -> None:
    kme = FakeKme([(503, {"message": "no path from W to Z"}), ConnectionRefusedError("down"),
                   (503, {})])
    log: list[str] = []
    got = retry(clock, log).run(lambda: kme.enc_keys("sae-z"), "enc_keys")
    assert "keys" in got
    assert clock.slept == [0.5, 1.0, 2.0]
    assert "HTTP 503: no path from W to Z; trying again in 0.5 s" in log[0]
    assert "no answer (ConnectionRefusedError" in log[1]


@pytest.mark.parametrize("status", [400, 401])
def test_400_and_401_are_final(clock: Clock, status: int) -> None:
    kme = FakeKme([(status, {"message": "this SAE is not authorized"})])
    with pytest.raises(RotateError, match=f"HTTP {status}: this SAE is not authorized"):
        retry(clock).run(lambda: kme.enc_keys("sae-z"), "enc_keys")
    assert clock.slept == []


def test_retries_give_up_after_their_time(clock: Clock) -> None:
    kme = FakeKme([(503, {"message": "busy"})] * 100)
    with pytest.raises(RotateError, match=r"busy \(gave up after 5 attempts\)"):
        retry(clock, give_up_after=10.0).run(lambda: kme.enc_keys("sae-z"), "enc_keys")
    assert sum(clock.slept) <= 10.0


def test_encodings() -> None:
    key = bytes(range(32))
    assert encode(key, "hex") == key.hex().encode() + b"\n"
    assert base64.b64decode(encode(key, "base64")) == key
    assert encode(key, "raw") == key


def test_write_atomically_replaces_with_mode_0600_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "psk"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psk"]


def test_write_atomically_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "psk"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):  # the write fails half way (here: not bytes)
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psk"]


def test_master_and_slave_hand_over_the_same_keys(tmp_path: Path, clock: Clock) -> None:
    kme = FakeKme([(503, {"message": "no key stored"})])
    m_out, s_out = tmp_path / "m", tmp_path / "s"
    m_cmd = [sys.executable, "-c", "import os,sys; open(sys.argv[1],'ab').write("
             "os.environ['KMSTN_KEY_ID'].encode()+b' '+sys.stdin.buffer.read())", str(m_out)]
    s_cmd = [*m_cmd[:-1], str(s_out)]
    announced: list[str] = []
    master = Consumer(tmp_path / "m.psk", m_cmd, "hex")
    assert rotate_master(kme, "sae-z", master, retry(clock), count=3, interval=7.0,
                         announce=announced.append, sleep=clock.sleep) == 3
    assert clock.slept == [0.5, 7.0, 7.0]  # one retry, then the interval between keys
    slave = Consumer(tmp_path / "s.psk", s_cmd, "hex")
    assert rotate_slave(kme, "sae-w", slave, retry(clock), iter(f"{k}\n" for k in announced)
                        ) == 3
    assert m_out.read_bytes() == s_out.read_bytes()
    assert [line.split()[0] for line in m_out.read_text().splitlines()] == announced
    assert (tmp_path / "m.psk").read_bytes() == (tmp_path / "s.psk").read_bytes()
    assert kme.calls == [("enc_keys", "sae-z")] * 4 + [("dec_keys", "sae-w")] * 3


def test_slave_skips_blank_lines_and_stops_at_count(clock: Clock) -> None:
    kme = FakeKme()
    ids = [kme.enc_keys("sae-z")[1]["keys"][0]["key_ID"] for _ in range(3)]
    got: list[str] = []

    class Record(Consumer):
        def take(self, key_id: str, material: bytes) -> None:
            got.append(key_id)

    lines: Iterator[str] = iter(["\n", f"{ids[0]}\n", "  \n", f"{ids[1]}\n", f"{ids[2]}\n"])
    assert rotate_slave(kme, "sae-w", Record(), retry(clock), lines, count=2) == 2
    assert got == ids[:2]


def test_a_failing_consumer_command_ends_the_run(tmp_path: Path, clock: Clock) -> None:
    kme = FakeKme()
    consumer = Consumer(None, [sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(RotateError, match="exited 3"):
        rotate_master(kme, "sae-z", consumer, retry(clock), count=1, announce=lambda _k: None)


@pytest.mark.parametrize("body", [{"keys": []}, {"keys": [{"key_ID": "x"}]},
                                  {"keys": [{"key_ID": "x", "key": "***"}]}, []])
def test_a_bad_key_container_is_refused(clock: Clock, body: Any) -> None:
    kme = FakeKme([(200, body)])
    with pytest.raises(RotateError):
        rotate_master(kme, "sae-z", Consumer(), retry(clock), count=1, announce=print)


def test_slave_refuses_a_key_other_than_the_one_asked(clock: Clock) -> None:
    other = str(uuid.uuid4())
    kme = FakeKme([(200, {"keys": [{"key_ID": other, "key": "AAAA"}]})])
    with pytest.raises(RotateError, match="asked for key"):
        rotate_slave(kme, "sae-w", Consumer(), retry(clock), [str(uuid.uuid4())])
