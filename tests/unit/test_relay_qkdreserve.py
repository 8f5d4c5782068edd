"""QKD hop keys reserved ahead of use: each used once, bound to its neighbour, forgotten."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence

import pytest

from kme.errors import ErrorCode, KmstnError
from kme.types import Key, NodeId, SecretBytes
from relay.qkdreserve import QkdReservePool, ReservedQkdKeys

A, B, C = NodeId("A"), NodeId("B"), NodeId("C")


class DevicePair:
    """Both ends of one device: enc_keys at one end, dec_keys (once) at the other."""

    def __init__(self) -> None:
        self.issued: dict[uuid.UUID, Key] = {}
        self.enc_calls = 0
        self.dec_calls = 0
        self.lock = threading.Lock()

    def enc_keys(self, number: int = 1, size: int | None = None) -> list[Key]:
        keys = [Key(uuid.uuid4(), SecretBytes(os.urandom(32)), 256) for _ in range(number)]
        with self.lock:
            self.enc_calls += 1
            self.issued.update({k.key_id: k for k in keys})
        return keys

    def dec_keys(self, key_ids: Sequence[uuid.UUID]) -> list[Key]:
        with self.lock:
            self.dec_calls += 1
            if any(k not in self.issued for k in key_ids):
                raise KmstnError(ErrorCode.KEY_NOT_FOUND, "not on the device")
            return [self.issued.pop(k) for k in key_ids]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(size: int = 4, ttl: int = 300) -> tuple[DevicePair, ReservedQkdKeys, QkdReservePool,
                                                   Clock]:
    device, clock = DevicePair(), Clock()
    receiver = ReservedQkdKeys(ttl, max_per_peer=16, clock=clock)
    pool = QkdReservePool(B, device, lambda ids: (receiver.hold(A, device, ids),
                                                  receiver.ttl_seconds)[1],
                          size, executor=None, clock=clock)
    return device, receiver, pool, clock


def test_announced_keys_open_without_a_device_call() -> None:
    device, receiver, pool, _ = setup()
    assert pool.refill() == 4
    assert device.enc_calls == 1 and device.dec_calls == 1  # one round trip for four keys
    for _ in range(4):
        key = pool.take()
        assert key is not None
        assert receiver.take(A, key.key_id) == key.material
    assert device.dec_calls == 1  # opening needed no device call
    assert pool.take() is None  # empty: the caller takes a key on the spot


def test_each_key_once_and_only_for_its_neighbour() -> None:
    _, receiver, pool, _ = setup()
    pool.refill()
    key = pool.take()
    assert key is not None
    assert receiver.take(C, key.key_id) is None  # announced by A, not by C
    assert receiver.take(A, key.key_id) == key.material
    assert receiver.take(A, key.key_id) is None  # never twice
    assert len({pool.take().key_id for _ in range(3)}) == 3  # type: ignore[union-attr]


def test_keys_expire_on_both_sides() -> None:
    _, receiver, pool, clock = setup(ttl=100)
    pool.refill()
    held = pool.take()
    assert held is not None
    clock.now += 95  # past the sender's margin (a tenth of the TTL): not used any more
    assert pool.take() is None
    clock.now += 10  # past the TTL: the receiver forgot them too
    assert receiver.take(A, held.key_id) is None


def test_failed_announcement_pools_nothing() -> None:
    device = DevicePair()

    def refuse(ids: Sequence[uuid.UUID]) -> int:
        raise KmstnError(ErrorCode.UNAVAILABLE, "neighbour down")

    pool = QkdReservePool(B, device, refuse, 4, executor=None)
    with pytest.raises(KmstnError):
        pool.refill()
    assert pool.take() is None


def test_receiver_holds_all_or_nothing_and_bounds_each_peer() -> None:
    device = DevicePair()
    receiver = ReservedQkdKeys(300, max_per_peer=4)
    keys = device.enc_keys(3)
    with pytest.raises(KmstnError):
        receiver.hold(A, device, [keys[0].key_id, uuid.uuid4()])  # one unknown: nothing held
    assert receiver.take(A, keys[0].key_id) is None
    with pytest.raises(KmstnError):
        receiver.hold(A, device, [k.key_id for k in device.enc_keys(5)])  # over the bound
    first = device.enc_keys(4)
    receiver.hold(A, device, [k.key_id for k in first])
    more = device.enc_keys(2)
    receiver.hold(A, device, [k.key_id for k in more])
    assert receiver.take(A, first[0].key_id) is None  # the oldest made room
    assert receiver.take(A, more[1].key_id) == more[1].material
