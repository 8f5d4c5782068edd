"""One-time ML-KEM-768 sessions (relay.kem): the receiver's store and the sender's pool."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId
from relay import kem
from relay.kempool import KeyPool, PoolKey

A, B = NodeId("A"), NodeId("B")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _encaps(key: kem.OneTimeKey) -> tuple[bytes, bytes]:
    secret, ct = kem.encapsulate(kem.load_public_key(key.public_key))
    return secret.reveal(), ct


def test_pipelined_session_opens_once() -> None:
    store = kem.SessionStore(60)
    (key,) = store.issue(A, 1)
    assert len(key.public_key) == kem.PUBLIC_KEY_BYTES and key.ttl_seconds == 60
    secret, ct = _encaps(key)
    assert store.take(A, key.session, ct).reveal() == secret
    with pytest.raises(KmstnError) as err:
        store.take(A, key.session, ct)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION
    assert "already used" in err.value.public
    assert len(store) == 0


def test_session_is_bound_to_the_peer_that_fetched_it() -> None:
    store = kem.SessionStore(60)
    (key,) = store.issue(A, 1)
    _, ct = _encaps(key)
    with pytest.raises(KmstnError) as err:
        store.take(B, key.session, ct)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION
    assert "unknown or expired" in err.value.public
    # The other neighbour's attempt did not burn A's session.
    store.take(A, key.session, ct)


def test_unknown_and_expired_sessions() -> None:
    clock = Clock()
    store = kem.SessionStore(60, clock=clock)
    with pytest.raises(KmstnError) as err:
        store.take(A, uuid.uuid4(), bytes(kem.CIPHERTEXT_BYTES))
    assert err.value.code is ErrorCode.UNKNOWN_SESSION
    (key,) = store.issue(A, 1)
    _, ct = _encaps(key)
    clock.now += 60
    with pytest.raises(KmstnError) as err:
        store.take(A, key.session, ct)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION
    assert len(store) == 0


def test_a_failed_decapsulation_still_burns_the_session() -> None:
    store = kem.SessionStore(60)
    (key,) = store.issue(A, 1)
    with pytest.raises(KmstnError) as err:
        store.take(A, key.session, b"short")
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(KmstnError) as err:
        store.take(A, key.session, bytes(kem.CIPHERTEXT_BYTES))
    assert err.value.code is ErrorCode.UNKNOWN_SESSION


def test_pipelined_session_needs_the_ciphertext() -> None:
    store = kem.SessionStore(60)
    (key,) = store.issue(A, 1)
    with pytest.raises(KmstnError) as err:
        store.take(A, key.session, None)
    assert "lacks kem_ciphertext" in err.value.public


def test_unpipelined_exchange() -> None:
    store = kem.SessionStore(60)
    (key,) = store.issue(A, 1)
    secret, ct = _encaps(key)
    store.exchange(A, key.session, ct)
    # The private key is gone: a second Encapsulated for the session is refused.
    with pytest.raises(KmstnError) as err:
        store.exchange(A, key.session, ct)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION
    # An envelope must not carry a ciphertext for an exchanged session.
    with pytest.raises(KmstnError) as err:
        store.take(A, key.session, ct)
    assert "already exchanged" in err.value.public
    # ... and that attempt burned it.
    with pytest.raises(KmstnError) as err:
        store.take(A, key.session, None)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION

    (key,) = store.issue(A, 1)
    secret, ct = _encaps(key)
    with pytest.raises(KmstnError):
        store.exchange(B, key.session, ct)  # not B's session
    store.exchange(A, key.session, ct)
    assert store.take(A, key.session, None).reveal() == secret
    with pytest.raises(KmstnError):
        store.take(A, key.session, None)


def test_exchange_with_a_bad_ciphertext_burns_the_session() -> None:
    store = kem.SessionStore(60)
    (key,) = store.issue(A, 1)
    with pytest.raises(KmstnError) as err:
        store.exchange(A, key.session, b"\x00" * 5)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(KmstnError) as err:
        store.take(A, key.session, None)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION


def test_issue_limits() -> None:
    store = kem.SessionStore(60, max_per_peer=10)
    with pytest.raises(KmstnError) as err:
        store.issue(A, 0)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    first = store.issue(A, 6)
    second = store.issue(A, 6)
    assert len(first) == 6 and len(second) == 6
    # Only 10 held for A: its two oldest were forgotten; B is unaffected.
    assert store.outstanding(A) == 10
    store.issue(B, 3)
    assert store.outstanding(B) == 3
    _, ct = _encaps(first[0])
    with pytest.raises(KmstnError):
        store.take(A, first[0].session, ct)
    _, ct = _encaps(first[2])
    store.take(A, first[2].session, ct)
    big = kem.SessionStore(60, max_per_peer=10_000)
    assert len(big.issue(A, 10_000)) == kem.MAX_KEYS_PER_REQUEST
    assert len({k.session for k in big.issue(A, 50)} | {k.session for k in first}) == 56


def test_concurrent_takes_open_a_session_once() -> None:
    store = kem.SessionStore(60)
    (key,) = store.issue(A, 1)
    _, ct = _encaps(key)
    wins: list[bytes] = []
    losses: list[ErrorCode] = []

    def attempt() -> None:
        try:
            wins.append(store.take(A, key.session, ct).reveal())
        except KmstnError as exc:
            losses.append(exc.code)

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and losses == [ErrorCode.UNKNOWN_SESSION] * 15


# -- sender pool ------------------------------------------------------------------------


class Receiver:
    """A fetch function backed by a real SessionStore, counting calls."""

    def __init__(self, store: kem.SessionStore, peer: NodeId = A) -> None:
        self.store = store
        self.peer = peer
        self.calls: list[int] = []
        self.repeat: list[kem.OneTimeKey] = []

    def __call__(self, count: int) -> Sequence[kem.OneTimeKey]:
        self.calls.append(count)
        return [*self.repeat, *self.store.issue(self.peer, count)]


def test_pool_hands_each_key_out_once_and_refills() -> None:
    receiver = Receiver(kem.SessionStore(300))
    pool = KeyPool(B, receiver, size=8, executor=None)
    taken = [pool.take() for _ in range(40)]
    assert len({k.session for k in taken}) == 40
    assert receiver.calls[0] == 8 and all(c <= 8 for c in receiver.calls)
    for k in taken[:5]:
        secret, ct = kem.encapsulate(k.public_key)
        assert receiver.store.take(A, k.session, ct) == secret


def test_pool_does_not_over_fetch_when_many_senders_find_it_empty() -> None:
    """Concurrent takers of an empty pool share one fetch at a time, so the neighbour is
    never asked for more sessions than the pool holds plus what was used."""
    receiver = Receiver(kem.SessionStore(300, max_per_peer=64))
    gate = threading.Barrier(24)
    slow_fetch = threading.Event()

    def fetch(count: int) -> Sequence[kem.OneTimeKey]:
        slow_fetch.wait(0.05)  # a fetch takes a while: others pile up behind it
        return receiver(count)

    pool = KeyPool(B, fetch, size=8, executor=None)
    taken: list[PoolKey] = []
    lock = threading.Lock()

    def sender() -> None:
        gate.wait()
        for _ in range(4):
            key = pool.take()
            _, ct = kem.encapsulate(key.public_key)
            receiver.store.take(A, key.session, ct)  # raises if the receiver forgot it
            with lock:
                taken.append(key)

    threads = [threading.Thread(target=sender) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({k.session for k in taken}) == len(taken) == 96
    assert sum(receiver.calls) <= len(taken) + 8


def test_pool_background_refill_below_low_water() -> None:
    receiver = Receiver(kem.SessionStore(300))
    with ThreadPoolExecutor(1) as executor:
        pool = KeyPool(B, receiver, size=8, executor=executor)
        pool.refill()
        assert len(pool) == 8
        for _ in range(5):  # 3 left < low water 4: a refill is scheduled
            pool.take()
    assert len(pool) == 8
    assert receiver.calls == [8, 5]


def test_pool_drops_keys_near_expiry_and_repeated_sessions() -> None:
    clock = Clock()
    receiver = Receiver(kem.SessionStore(100, clock=clock))
    pool = KeyPool(B, receiver, size=4, executor=None, clock=clock)
    first = pool.take()
    # A neighbour that repeats a session ID does not get it used twice.
    receiver.repeat = [kem.OneTimeKey(first.session, first.public_key.public_bytes_raw(), 100)]
    pool.clear()
    again = [pool.take() for _ in range(6)]
    assert first.session not in {k.session for k in again}
    # Keys are not used in the last tenth of their lifetime.
    receiver.repeat = []
    pool.clear()
    pool.refill(2)
    clock.now += 90
    assert len(pool) == 0
    fresh = pool.take()
    assert fresh.use_before == pytest.approx(clock.now + 90)


def test_pool_gives_up_when_the_neighbour_sends_nothing() -> None:
    pool = KeyPool(B, lambda n: [], size=4, executor=None)
    with pytest.raises(KmstnError) as err:
        pool.take()
    assert err.value.code is ErrorCode.UNAVAILABLE


def test_pool_rejects_bad_public_keys() -> None:
    bad = [kem.OneTimeKey(uuid.uuid4(), b"\x00" * 10, 60)]
    pool = KeyPool(B, lambda n: bad, size=4, executor=None)
    with pytest.raises(KmstnError) as err:
        pool.take()
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
