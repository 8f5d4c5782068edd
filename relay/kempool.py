"""The sender's side of the one-time ML-KEM-768 exchange: a pool of a neighbour's keys.

See relay/kem.py for the exchange. The pool does no network I/O itself: it
is given a fetch function (RelayPeer.PublicKeys toward the neighbour).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import mlkem

from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId
from relay.kem import MAX_KEYS_PER_REQUEST, OneTimeKey, load_public_key

__all__ = ["KeyPool", "PoolKey"]


@dataclass(frozen=True, slots=True)
class PoolKey:
    """A neighbour's one-time public key, parsed, with our local deadline for using it."""

    session: uuid.UUID
    public_key: mlkem.MLKEM768PublicKey
    use_before: float


FetchFn = Callable[[int], Sequence[OneTimeKey]]


@dataclass
class _PoolState:
    keys: collections.deque[PoolKey] = field(default_factory=collections.deque)
    refilling: bool = False


class KeyPool:
    """A sender's pool of one neighbour's one-time public keys.

    ``take`` hands out each key at most once. Below the low-water mark a
    background refill runs on ``executor``; an empty pool fetches in the
    caller's thread. Keys are used only well before the receiver forgets
    them (a margin of a tenth of the TTL, at most 30 s), and session IDs the
    neighbour hands out twice are dropped, so that no session can be named by
    two of our envelopes. Thread-safe.

    Fetches are single-flight and fill the pool only up to its size: when
    many senders found the pool empty at once, each used to fetch a full
    pool, the neighbour issued more sessions than it keeps per peer, evicted
    its oldest ones (the very ones we use first), and every retry fetched
    again. Now callers that find the pool empty wait for the one fetch in
    progress.
    """

    def __init__(self, peer: NodeId, fetch: FetchFn, size: int, executor: Executor | None,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger | None = None) -> None:
        if size <= 0:
            raise ValueError("pool size must be positive")
        self.peer = peer
        self._fetch = fetch
        self._size = size
        self._low_water = max(1, size // 2)
        self._executor = executor
        self._clock = clock
        self._log = log or logging.getLogger("kmstn.relay.kem")
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()  # one fetch at a time, never held with _lock
        self._state = _PoolState()
        # Session IDs we have ever been given, with when we may forget them.
        self._seen: collections.OrderedDict[uuid.UUID, float] = collections.OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            self._drop_stale(self._clock())
            return len(self._state.keys)

    def take(self) -> PoolKey:
        """One unused, unexpired public key of the neighbour (fetching if needed)."""
        for _ in range(3):
            with self._lock:
                self._drop_stale(self._clock())
                key = self._state.keys.popleft() if self._state.keys else None
                start_refill = (len(self._state.keys) < self._low_water
                                and not self._state.refilling and self._executor is not None)
                if start_refill:
                    self._state.refilling = True
            if start_refill:
                assert self._executor is not None  # noqa: S101 - narrowed just above
                self._executor.submit(self._background_refill)
            if key is not None:
                return key
            self.refill(self._size)
        raise KmstnError(ErrorCode.UNAVAILABLE,
                         f"no usable one-time KEM keys from neighbour {self.peer}")

    def refill(self, count: int | None = None) -> int:
        """Fetch keys from the neighbour now, up to the pool size (at most ``count``);
        return how many were added. Concurrent callers wait for one another."""
        with self._fetch_lock:
            wanted = self._size - len(self)
            if count is not None:
                wanted = min(wanted, count)
            if wanted <= 0:
                return 0
            return self._add(self._fetch(min(wanted, MAX_KEYS_PER_REQUEST)))

    def _add(self, fetched: Sequence[OneTimeKey]) -> int:
        now = self._clock()
        parsed: list[PoolKey] = []
        for offered in fetched:
            if offered.ttl_seconds <= 0:
                continue
            margin = min(30.0, offered.ttl_seconds / 10)
            parsed.append(PoolKey(offered.session, load_public_key(offered.public_key),
                                  now + offered.ttl_seconds - margin))
        added = 0
        with self._lock:
            for k in parsed:
                if k.session in self._seen:
                    self._log.warning("neighbour repeated a KEM session ID; key dropped",
                                      extra={"peer": self.peer, "session": str(k.session)})
                    continue
                self._seen[k.session] = k.use_before + 3600.0
                self._state.keys.append(k)
                added += 1
            self._forget_seen(now)
        return added

    def clear(self) -> None:
        with self._lock:
            self._state.keys.clear()

    def _background_refill(self) -> None:
        try:
            self.refill()
        except KmstnError as exc:
            self._log.warning("KEM key refill failed", extra={
                "peer": self.peer, "error_code": exc.code.name, "error": exc.public,
                "cause": exc.cause})
        except Exception:
            self._log.exception("KEM key refill crashed", extra={"peer": self.peer})
        finally:
            with self._lock:
                self._state.refilling = False

    def _drop_stale(self, now: float) -> None:
        keys = self._state.keys
        while keys and keys[0].use_before <= now:
            keys.popleft()

    def _forget_seen(self, now: float) -> None:
        while self._seen:
            session, until = next(iter(self._seen.items()))
            if until > now:
                break
            del self._seen[session]
