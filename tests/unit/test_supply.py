"""Issue 11's pure parts: token buckets, quotas, deficit round robin, the wait queue."""

from __future__ import annotations

import collections
import logging
import threading

import pytest

from kme.config import QuotaSettings, SupplySettings
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import KeyLimits, Status
from kme.flows.supply import Quotas, Supply, TokenBucket, Turn, drr_grants, jain_index
from kme.types import SaeId


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(100.0, 512, clock)
    assert bucket.take(512) == 0.0
    assert bucket.take(256) == pytest.approx(2.56)  # 256 bits at 100 b/s
    clock.now += 10
    assert bucket.level() == 512  # never above the burst
    assert bucket.take(1024) == float("inf")  # more than a burst can ever hold


def test_over_quota_is_refused_with_retry_after_and_refunded_on_failure() -> None:
    clock = Clock()
    quotas = Quotas([QuotaSettings(SaeId("a"), 256.0, 512),
                     QuotaSettings(SaeId("a"), 1000.0, 10_000, SaeId("s"))], clock)
    refund = quotas.charge("a", ["s"], 512)
    with pytest.raises(KmstnError) as err:
        quotas.charge("a", ["s"], 256)
    assert err.value.code is ErrorCode.OVER_QUOTA
    assert err.value.retry_after_s == 1 and "SAE 'a'" in err.value.public
    refund()  # the request failed later: its bits are the SAE's again
    quotas.charge("a", ["s"], 512)
    # Another SAE has no quota here and is never charged for a's use.
    quotas.charge("b", ["s"], 1_000_000)
    with pytest.raises(KmstnError) as err:
        quotas.charge("a", ["s"], 4096)
    assert err.value.code is ErrorCode.OVER_QUOTA and err.value.retry_after_s is None


def _queues(spec: dict[str, int]) -> tuple[dict[str, collections.deque[Turn]],
                                          collections.deque[str]]:
    queues = {sae: collections.deque(Turn(sae, 1, 256) for _ in range(n))
              for sae, n in spec.items()}
    return queues, collections.deque(spec)


def test_deficit_round_robin_shares_scarce_key_equally_whoever_queues_more() -> None:
    queues, order = _queues({"greedy": 30, "b": 3, "c": 3})
    deficit: dict[str, int] = {}
    served = collections.Counter(t.sae for t in drr_grants(queues, order, deficit, 6, 256))
    assert served == {"greedy": 2, "b": 2, "c": 2}
    served = collections.Counter(t.sae for t in drr_grants(queues, order, deficit, 3, 256))
    assert served == {"greedy": 1, "b": 1, "c": 1}
    # Once the others are served, what is left goes to the one still waiting.
    assert [t.sae for t in drr_grants(queues, order, deficit, 5, 256)] == ["greedy"] * 5
    assert jain_index([3, 3, 3]) == 1.0 and jain_index([9, 0, 0]) == pytest.approx(1 / 3)


def test_a_large_request_keeps_its_credit_until_enough_key_is_there() -> None:
    queues = {"big": collections.deque([Turn("big", 4, 1024)]),
              "small": collections.deque(Turn("small", 1, 256) for _ in range(8))}
    order: collections.deque[str] = collections.deque(["big", "small"])
    deficit: dict[str, int] = {}
    # Three keys: the big request does not fit; the small ones may not take
    # everything while it earns credit.
    got = drr_grants(queues, order, deficit, 3, 256)
    assert [t.sae for t in got] == ["small"] * 3
    got = drr_grants(queues, order, deficit, 4, 256)
    assert [t.sae for t in got] == ["big"]


def _closed_loop(resting: dict[str, tuple[int, int]] | None, blocks: int = 40
                 ) -> collections.Counter[str]:
    """Key in blocks of 16; a and b ask for one key, again as soon as each is answered;
    greedy keeps six four-key requests queued. Bits each SAE got."""
    queues = {"a": collections.deque([Turn("a", 1, 256)]),
              "b": collections.deque([Turn("b", 1, 256)]),
              "greedy": collections.deque(Turn("greedy", 4, 1024) for _ in range(6))}
    order: collections.deque[str] = collections.deque(queues)
    deficit: dict[str, int] = {}
    served: collections.Counter[str] = collections.Counter()
    stored = 0
    for _ in range(blocks):
        stored += 16
        back: list[str] = []
        granted = drr_grants(queues, order, deficit, stored, 256, resting)
        while granted or back:
            for turn in granted:
                stored -= turn.keys
                served[turn.sae] += turn.bits
                if turn.sae == "greedy":
                    queues["greedy"].append(Turn("greedy", 4, 1024))
                else:
                    back.append(turn.sae)
            if not back:
                break
            sae = back.pop(0)  # its next request arrives (Supply.wait_turn)
            queues[sae].append(Turn(sae, 1, 256))
            if resting is not None:
                resting.pop(sae, None)
            if sae not in order:
                order.append(sae)
            granted = drr_grants(queues, order, deficit, stored, 256, resting)
    return served


def test_a_client_that_asks_again_when_answered_keeps_its_share_against_a_queue() -> None:
    served = _closed_loop({})
    assert sum(served.values()) == 40 * 16 * 256  # every key of every block is handed out
    assert jain_index(list(served.values())) >= 0.99
    assert max(served.values()) <= 1.1 * min(served.values())
    # Without rests the queue wins: the others are away whenever key is left over.
    plain = _closed_loop(None)
    assert plain["greedy"] > 2 * plain["a"]


def test_rests_hold_no_key_when_there_is_enough_for_everyone() -> None:
    queues = {"a": collections.deque([Turn("a", 1, 256)]),
              "greedy": collections.deque(Turn("greedy", 4, 1024) for _ in range(3))}
    order: collections.deque[str] = collections.deque(queues)
    deficit: dict[str, int] = {}
    resting: dict[str, tuple[int, int]] = {}
    got = drr_grants(queues, order, deficit, 1000, 256, resting)
    assert collections.Counter(t.sae for t in got) == {"a": 1, "greedy": 3}
    # Each was served while the other had a place: both rest, owed their last request.
    assert resting == {"a": (256, 1), "greedy": (1024, 4)}
    resting.pop("greedy")  # it asks again (Supply.wait_turn ends its rest)
    queues["greedy"].extend(Turn("greedy", 4, 1024) for _ in range(3))
    got = drr_grants(queues, order, deficit, 1000, 256, resting)
    assert [t.sae for t in got] == ["greedy"] * 3  # a's rest holds nothing back


def _supply(clock: Clock, wait_ms: int = 30_000) -> tuple[Supply, dict[str, int]]:
    stored = {"n": 0}
    limits = KeyLimits(256, 64, 1024, 128, 8)

    def status() -> Status:
        return Status.of(source_kme_id="A", target_kme_id="B", master_sae_id="m",
                         slave_sae_id="s", limits=limits, stored_key_count=stored["n"],
                         max_key_count=1000)

    supply = Supply(SupplySettings(wait_ms=wait_ms), {"L": status}, lambda _l: 0,
                    logging.getLogger("test"), clock)
    return supply, stored


def test_a_waiting_request_is_woken_by_the_arrival_of_key() -> None:
    clock = Clock()
    supply, stored = _supply(clock)
    supply.poll_once()
    turns: list[Turn] = []
    waiter = threading.Thread(target=lambda: turns.append(
        supply.wait_turn("L", "m", 1, 256, clock.now + 3600)))
    waiter.start()
    while not supply.must_queue("L"):  # the waiter is queued
        threading.Event().wait(0.001)
    stored["n"] = 1
    supply.poll_once()  # the device's store grew: the turn is given
    waiter.join()
    assert turns and turns[0].granted
    assert supply.must_queue("L")  # its key is promised until it drew
    supply.done("L", turns[0])
    assert not supply.must_queue("L")


def test_the_wait_ends_with_retry_after_from_the_measured_rate() -> None:
    clock = Clock()
    supply, _ = _supply(clock)
    supply.observe("L", 0, 256)
    clock.now += 10
    supply.observe("L", 4, 256)  # 1,024 bits in 10 s: ~102 b/s
    supply.drew("L", 4)  # this node drew them all
    with pytest.raises(KmstnError) as err:
        supply.wait_turn("L", "m", 4, 1024, clock.now)  # budget already spent
    assert err.value.code is ErrorCode.INSUFFICIENT_KEY
    assert err.value.retry_after_s == 10  # 1,024 bits at 102.4 b/s
    assert not supply.must_queue("L")  # a timed-out request leaves the queue


def test_a_rest_ends_and_then_the_key_goes_to_whoever_waits() -> None:
    clock = Clock()
    supply, _ = _supply(clock)
    supply.observe("L", 0, 256)
    got: dict[str, Turn] = {}

    def wait(sae: str, keys: int, bits: int) -> threading.Thread:
        t = threading.Thread(target=lambda: got.__setitem__(
            sae, supply.wait_turn("L", sae, keys, bits, clock.now + 3600)))
        t.start()
        return t

    waiters = [wait("a", 1, 256), wait("greedy", 4, 1024)]
    while supply.waiting("L") < 2:
        threading.Event().wait(0.001)
    supply.observe("L", 2, 256)  # two keys: a is served, greedy's four do not fit
    waiters[0].join()
    supply.done("L", got["a"])
    supply.drew("L", 1)
    assert supply.must_queue("L")  # a rests: it keeps its place
    supply.observe("L", 4, 256)  # greedy's four, but then a's next key is not there
    waiters[1].join(timeout=0.2)  # a grant would end this thread at once
    assert waiters[1].is_alive() and "greedy" not in got
    clock.now += 1.0  # a did not come back
    supply.observe("L", 4, 256)
    waiters[1].join()
    assert got["greedy"].granted
    supply.done("L", got["greedy"])
    assert not supply.must_queue("L")
