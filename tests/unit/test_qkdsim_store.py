"""lab.qkdsim.store: the rate model and the shared key stream, on a simulated clock."""

from __future__ import annotations

import itertools
import random
import statistics
import uuid
from dataclasses import replace
from typing import Any

import pytest

from kme.config import DeviceEndpoint, Outage, QkdLink, QkdSimSettings
from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId
from lab.qkdsim.store import KeyStream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_link(rate: float = 2500.0, block: int = 1024, max_keys: int = 1000,
              **sim: Any) -> QkdLink:
    return QkdLink(
        id="L", kind="qkd", a=NodeId("A"), b=NodeId("B"), cost=1.0,
        secret_key_rate=rate, block_size=block, key_size=256, max_key_count=max_keys,
        alice=DeviceEndpoint("127.0.0.1", 1, "L-alice", SaeId("A")),
        bob=DeviceEndpoint("127.0.0.1", 2, "L-bob", SaeId("B")),
        sim=QkdSimSettings(**{"seed": 7, **sim}),
    )


def stream(link: QkdLink) -> tuple[KeyStream, Clock]:
    clock = Clock()
    return KeyStream(link, clock=clock, rng=random.Random(link.sim.seed)), clock


def test_mean_rate_matches_the_configured_rate() -> None:
    # 40,000 s at 2,500 b/s in 1,024-bit blocks: about 98,000 blocks, so the
    # Poisson spread of the total is about 0.3 %.
    s, clock = stream(make_link(max_keys=10**9))
    clock.now += 40_000
    stats = s.stats()
    assert stats.dropped_bits == 0
    assert stats.generated_bits == stats.blocks * 1024 == stats.stored_bits
    assert stats.generated_bits / 40_000 == pytest.approx(2500, rel=0.02)


def gaps(link: QkdLink, blocks: int = 5000) -> list[float]:
    """Times between block arrivals, observed by stepping the clock finely."""
    s, clock = stream(link)
    arrivals: list[float] = []
    seen = 0
    while len(arrivals) < blocks:
        clock.now += 0.01
        s.tick()
        if s.blocks > seen:
            arrivals += [clock.now] * (s.blocks - seen)
            seen = s.blocks
    return [b - a for a, b in itertools.pairwise(arrivals)]


def test_blocks_arrive_at_irregular_intervals() -> None:
    # Paper section I: key arrives in bursts at irregular intervals, not as
    # a steady drip. Exponential gaps have a coefficient of variation of 1.
    g = gaps(make_link(rate=10_240.0, block=1024, max_keys=10**9))  # 10 blocks/s
    assert statistics.mean(g) == pytest.approx(0.1, rel=0.05)
    assert statistics.pstdev(g) / statistics.mean(g) == pytest.approx(1.0, abs=0.1)


def test_arrival_shape_makes_blocks_more_regular() -> None:
    g = gaps(make_link(rate=10_240.0, block=1024, max_keys=10**9, arrival_shape=4.0))
    assert statistics.mean(g) == pytest.approx(0.1, rel=0.05)
    assert statistics.pstdev(g) / statistics.mean(g) == pytest.approx(0.5, abs=0.08)


def test_same_seed_same_arrivals() -> None:
    link = make_link(max_keys=10**9)
    a, ca = stream(link)
    b, cb = stream(link)
    for step in (3.0, 10.0, 0.5, 100.0):
        ca.now += step
        cb.now += step
        assert a.stats().generated_bits == b.stats().generated_bits


@pytest.mark.parametrize("multiplier", [0.5, 2.0])
def test_rate_multiplier_scales_the_rate(multiplier: float) -> None:
    s, clock = stream(make_link(max_keys=10**9, rate_multiplier=multiplier))
    clock.now += 40_000
    assert s.stats().generated_bits / 40_000 == pytest.approx(2500 * multiplier, rel=0.03)


def test_rate_multiplier_zero_stops_generation() -> None:
    s, clock = stream(make_link(rate_multiplier=0.0, initial_keys=3))
    clock.now += 10**6
    assert s.stored_key_count() == 3
    assert s.stats().generated_bits == 0


def test_finite_store_drops_new_material_when_full() -> None:
    s, clock = stream(make_link(max_keys=100))  # 25,600 bits
    clock.now += 3600  # about 9 Mbit arrive
    stats = s.stats()
    assert s.stored_key_count() == 100
    assert stats.stored_bits == s.capacity_bits == 25_600
    assert stats.dropped_bits > 0
    assert stats.generated_bits == pytest.approx(2500 * 3600, rel=0.05)
    assert stats.generated_bits == stats.stored_bits + stats.dropped_bits
    # Taking keys makes room; new blocks fill it again, never beyond.
    s.issue("alice", "A", "B", 50, 256)
    assert s.stored_key_count() == 50
    clock.now += 3600
    assert s.stored_key_count() == 100
    stats = s.stats()
    assert stats.generated_bits == stats.stored_bits + stats.dropped_bits + stats.delivered_bits


def test_outage_window_generates_nothing() -> None:
    link = make_link(max_keys=10**9, outages=(Outage(100.0, 1000.0),))
    s, clock = stream(link)
    clock.now += 99.9
    before = s.stats().generated_bits
    assert not s.in_outage()
    clock.now += 0.1
    assert s.in_outage()
    clock.now += 999.9
    assert s.in_outage()
    assert s.stats().generated_bits == before
    clock.now += 0.1
    assert not s.in_outage()
    clock.now += 1000
    assert s.stats().generated_bits / 1100 == pytest.approx(2500, rel=0.15)


def test_initial_keys_are_capped_by_the_store() -> None:
    assert stream(make_link(initial_keys=10, rate_multiplier=0.0))[0].stored_key_count() == 10
    assert stream(make_link(max_keys=5, initial_keys=10,
                            rate_multiplier=0.0))[0].stored_key_count() == 5


# -- issue and take ------------------------------------------------------------------------


def filled(**sim: Any) -> tuple[KeyStream, Clock]:
    return stream(make_link(rate_multiplier=0.0, initial_keys=100, **sim))


def test_a_key_issued_at_one_end_is_taken_once_at_the_other() -> None:
    s, _ = filled()
    keys = s.issue("alice", "A", "B", 3, 512)
    assert s.stored_key_count() == 100 - 6
    got = s.take("bob", "A", "B", [k.key_id for k in keys])
    assert [(k.key_id, k.material, k.size_bits) for k in got] == \
        [(k.key_id, k.material, k.size_bits) for k in keys]
    with pytest.raises(KmstnError) as err:
        s.take("bob", "A", "B", [keys[0].key_id])
    assert err.value.code is ErrorCode.KEY_NOT_FOUND


def test_keys_never_wait_at_the_end_that_issued_them() -> None:
    s, _ = filled()
    key = s.issue("bob", "B", "A", 1, 256)[0]
    with pytest.raises(KmstnError):
        s.take("bob", "B", "A", [key.key_id])
    assert s.take("alice", "B", "A", [key.key_id])[0].material == key.material


def test_take_is_all_or_nothing() -> None:
    s, _ = filled()
    keys = s.issue("alice", "A", "B", 2, 256)
    with pytest.raises(KmstnError) as err:
        s.take("bob", "A", "B", [keys[0].key_id, uuid.uuid4()])
    assert err.value.code is ErrorCode.KEY_NOT_FOUND
    with pytest.raises(KmstnError):
        s.take("bob", "C", "B", [keys[0].key_id])  # wrong master: not found, nothing taken
    assert len(s.take("bob", "A", "B", [k.key_id for k in keys])) == 2


def test_take_by_a_slave_the_key_was_not_issued_for_is_denied() -> None:
    s, _ = filled()
    key = s.issue("alice", "A", "B", 1, 256)[0]
    with pytest.raises(KmstnError) as err:
        s.take("bob", "A", "X", [key.key_id])
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    assert s.take("bob", "A", "B", [key.key_id])[0].key_id == key.key_id


def test_too_little_stored_is_insufficient_key_and_takes_nothing() -> None:
    s, _ = filled()
    with pytest.raises(KmstnError) as err:
        s.issue("alice", "A", "B", 101, 256)
    assert err.value.code is ErrorCode.INSUFFICIENT_KEY
    assert s.stored_key_count() == 100
    assert len(s.issue("alice", "A", "B", 100, 256)) == 100
    assert s.stored_key_count() == 0


def test_key_bytes_come_from_the_csprng_not_the_seed() -> None:
    a, _ = filled()
    b, _ = filled()
    assert a.issue("alice", "A", "B", 1, 256)[0].material != \
        b.issue("alice", "A", "B", 1, 256)[0].material


def test_issued_keys_expire_after_the_ttl() -> None:
    s, clock = filled(issued_ttl_s=60.0)
    old = s.issue("alice", "A", "B", 1, 256)[0]
    clock.now += 30
    new = s.issue("alice", "A", "B", 1, 256)[0]
    clock.now += 31
    with pytest.raises(KmstnError):
        s.take("bob", "A", "B", [old.key_id])
    assert s.take("bob", "A", "B", [new.key_id])
    assert s.stats().expired_keys == 1


def test_bad_sizes_are_refused_before_touching_the_store() -> None:
    s, _ = filled()
    for number, size in ((1, 17), (1, 0), (0, 256)):
        with pytest.raises(ValueError):
            s.issue("alice", "A", "B", number, size)
    assert s.stored_key_count() == 100


def test_zero_rate_means_no_blocks() -> None:
    link = replace(make_link(), secret_key_rate=0.0)
    s, clock = stream(link)
    clock.now += 10**6
    assert s.stats().blocks == 0


def test_pending_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.qkdsim import store as store_module

    monkeypatch.setattr(store_module, "MAX_PENDING", 5)
    s, _ = filled()
    keys = s.issue("alice", "A", "B", 4, 256) + s.issue("bob", "B", "A", 3, 256)
    assert sum(s.stats().pending.values()) == 5
    assert s.stats().expired_keys == 2
    with pytest.raises(KmstnError):
        s.take("bob", "A", "B", [keys[0].key_id])  # the oldest went first
    assert s.take("alice", "B", "A", [keys[-1].key_id])
