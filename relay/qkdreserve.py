"""QKD hop keys taken ahead of use and announced to the neighbour (RelayPeer.ReserveQkdKeys).

On a QKD hop the sender takes a 256-bit key from its side of the shared
device and the receiver reads the same key, by ID, from its side. Done per
message, that is two ETSI 014 round trips on the hot path of every QKD hop.
So the sender keeps a small pool: in the background it takes a few keys from
its device and announces their IDs to the neighbour's relay, which reads
them from its device at once and holds them for this sender. A sealed
envelope then names a held key and neither side waits on a device.

The same rules as for one-time KEM keys hold: each key protects one
envelope at most (taken from the pool once, popped from the receiver's
store once), keys are bound to the neighbour they were announced to, and
both sides forget them after a TTL. A key the receiver does not hold (it
restarted, or the sender sealed with a key taken on the spot because its
pool was empty) is still fetched from the device by ID, as without a pool.
Keys held in memory are exposed to a memory dump of the relay for at most
the TTL, like the one-time KEM private keys; they are never written down.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from kme.errors import ErrorCode, KmstnError
from kme.types import Key, NodeId, SecretBytes
from relay.hopkey import QKD_KEY_BITS, DeviceClient

__all__ = ["QkdReservePool", "ReservedQkdKeys"]

# Announce(key_ids) -> seconds the receiver holds them.
AnnounceFn = Callable[[Sequence[uuid.UUID]], int]


@dataclass(frozen=True, slots=True)
class _Held:
    key: Key
    use_before: float


class QkdReservePool:
    """Sender: QKD keys toward one neighbour, already held by that neighbour."""

    def __init__(self, peer: NodeId, device: DeviceClient, announce: AnnounceFn, size: int,
                 executor: Executor | None, clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger | None = None) -> None:
        self.peer = peer
        self._device = device
        self._announce = announce
        self._size = size
        self._low_water = max(1, size // 2)
        self._executor = executor
        self._clock = clock
        self._log = log or logging.getLogger("kmstn.relay.qkd")
        self._keys: collections.deque[_Held] = collections.deque()
        self._lock = threading.Lock()
        self._refill_lock = threading.Lock()  # one refill at a time, never held with _lock
        self._refilling = False

    def __len__(self) -> int:
        with self._lock:
            self._drop_stale()
            return len(self._keys)

    def take(self) -> Key | None:
        """A held key, or None (the caller takes one from the device on the spot)."""
        with self._lock:
            self._drop_stale()
            held = self._keys.popleft() if self._keys else None
            start = (len(self._keys) < self._low_water and not self._refilling
                     and self._executor is not None)
            if start:
                self._refilling = True
        if start and self._executor is not None:
            self._executor.submit(self._background_refill)
        return held.key if held is not None else None

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()

    def refill(self) -> int:
        """Take keys from the device, announce them, and pool them; return how many."""
        with self._refill_lock:
            wanted = self._size - len(self)
            if wanted <= 0:
                return 0
            keys = self._device.enc_keys(wanted, QKD_KEY_BITS)
            if any(k.size_bits != QKD_KEY_BITS for k in keys):
                raise KmstnError(ErrorCode.UNAVAILABLE, "QKD device returned an unexpected key")
            ttl = self._announce([k.key_id for k in keys])
            use_before = self._clock() + ttl - min(30.0, ttl / 10)
            with self._lock:
                self._keys.extend(_Held(k, use_before) for k in keys)
            return len(keys)

    def _background_refill(self) -> None:
        try:
            self.refill()
        except KmstnError as exc:
            # Keys already taken from the device are lost if the announcement
            # failed; the next envelopes take keys on the spot instead.
            self._log.warning("QKD key reservation failed", extra={
                "peer": self.peer, "error_code": exc.code.name, "error": exc.public,
                "cause": exc.cause})
        except Exception:
            self._log.exception("QKD key reservation crashed", extra={"peer": self.peer})
        finally:
            with self._lock:
                self._refilling = False

    def _drop_stale(self) -> None:
        now = self._clock()
        while self._keys and self._keys[0].use_before <= now:
            self._keys.popleft()


class ReservedQkdKeys:
    """Receiver: QKD keys announced by neighbours, read from our side of each device."""

    def __init__(self, ttl_s: int, max_per_peer: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._max = max_per_peer
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[NodeId, collections.OrderedDict[uuid.UUID, tuple[SecretBytes,
                                                                          float]]] = {}

    @property
    def ttl_seconds(self) -> int:
        return self._ttl

    def hold(self, peer: NodeId, device: DeviceClient, key_ids: Sequence[uuid.UUID]) -> int:
        """Read the announced keys from our device (all or nothing) and hold them."""
        if not key_ids or len(key_ids) > self._max:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             f"announce between 1 and {self._max} key IDs")
        keys = device.dec_keys(list(key_ids))
        if any(k.size_bits != QKD_KEY_BITS for k in keys):
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, f"QKD hop keys are {QKD_KEY_BITS} bits")
        expires = self._clock() + self._ttl
        with self._lock:
            held = self._held.setdefault(peer, collections.OrderedDict())
            for k in keys:
                held[k.key_id] = (k.material, expires)
            while len(held) > self._max:  # a sender that announces and never uses
                held.popitem(last=False)
        return len(keys)

    def take(self, peer: NodeId, key_id: uuid.UUID) -> SecretBytes | None:
        """The held key ``key_id`` announced by ``peer`` (once), or None."""
        now = self._clock()
        with self._lock:
            held = self._held.get(peer)
            if not held:
                return None
            while held:
                _, (_, expires) = next(iter(held.items()))
                if expires > now:
                    break
                held.popitem(last=False)
            found = held.pop(key_id, None)
        if found is None or found[1] <= now:
            return None
        return found[0]
