"""The shared key stream of one emulated QKD link: generation, issue, take.

Pure logic with an injectable clock and random source, so the rate model is
tested without sleeping. The HTTP side (``lab.qkdsim.server``) calls it from
one event loop thread only; nothing here locks or blocks.

Rate model (see also the package docstring):

- Key material arrives in blocks of ``block_size`` bits. The gap between
  blocks is gamma-distributed with mean ``block_size / (secret_key_rate *
  rate_multiplier)`` seconds and shape ``arrival_shape`` (1 = exponential
  gaps, i.e. Poisson arrivals: irregular bursts, not a steady drip).
- The store holds at most ``max_key_count * key_size`` bits. A block that
  does not fit is cut to the free space and the rest is dropped (counted in
  ``dropped_bits``), as a device with a full buffer discards new key.
- No block arrives during an outage window, nor while ``rate_multiplier``
  is 0.
- Arrivals are computed lazily on each call (the store catches up to "now"),
  so an idle emulator costs nothing. While the store is full the pending
  gaps are skipped in one step: with exponential gaps this is exact (the
  process is memoryless); with other shapes it is a close approximation and
  only changes which dropped blocks are counted.

The store keeps a bit *count*, not the bits: key bytes are drawn from the
operating system's CSPRNG when a key is issued. An emulated quantum channel
is a perfect shared random source, so drawing at issue time is
indistinguishable from drawing at block arrival, and it keeps a 100,000-key
store from costing memory copies on every request. What the two ends must
share, they do share: an issued key's bytes are kept for the other end until
it takes them, until ``issued_ttl_s`` passes, or, if more than
``MAX_PENDING`` keys wait, until they are the oldest.
"""

from __future__ import annotations

import math
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from kme import etsi014
from kme.config import QkdLink
from kme.types import Key, SecretBytes

__all__ = ["MAX_PENDING", "End", "KeyStream", "StreamStats"]

# Issued keys waiting at both ends together, at most (about 300 MB at worst).
MAX_PENDING: Final = 1_000_000

End = Literal["alice", "bob"]
_OTHER: dict[End, End] = {"alice": "bob", "bob": "alice"}


@dataclass(frozen=True, slots=True)
class _Issued:
    material: bytes
    size_bits: int
    master: str
    slave: str
    expires: float


@dataclass(frozen=True, slots=True)
class StreamStats:
    generated_bits: int  # bits that arrived (kept or dropped)
    dropped_bits: int  # bits that arrived while the store was full
    delivered_bits: int  # bits handed out by enc_keys at either end
    stored_bits: int
    blocks: int
    pending: dict[str, int]  # issued keys waiting at each end
    expired_keys: int  # issued keys never taken before issued_ttl_s


class KeyStream:
    """The key store shared by Alice and Bob of one QKD link."""

    def __init__(self, link: QkdLink, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 urandom: Callable[[int], bytes] = os.urandom) -> None:
        self.link = link
        sim = link.sim
        self._clock = clock
        # The seed fixes the arrival times only; key bytes always come from
        # the CSPRNG, so a seeded emulator never hands out predictable keys.
        self._rng = rng or random.Random(sim.seed)  # noqa: S311 - timing, not secrets
        self._urandom = urandom
        self.start = clock()
        self.capacity_bits = link.max_key_count * link.key_size
        self.block_bits = link.block_size
        rate = link.secret_key_rate * sim.rate_multiplier
        self._mean_gap = self.block_bits / rate if rate > 0 else math.inf
        self._shape = sim.arrival_shape
        self._outages = tuple((self.start + o.start_s, self.start + o.start_s + o.duration_s)
                              for o in sim.outages)
        self._ttl = sim.issued_ttl_s
        self.stored_bits = min(sim.initial_keys, link.max_key_count) * link.key_size
        self.generated_bits = 0
        self.dropped_bits = 0
        self.delivered_bits = 0
        self.blocks = 0
        self.expired_keys = 0
        self._next = self.start + self._gap()
        self._pending: dict[End, dict[uuid.UUID, _Issued]] = {"alice": {}, "bob": {}}
        # Issue order is expiry order (one TTL for all), so expiry is a FIFO.
        self._expiry: deque[tuple[float, End, uuid.UUID]] = deque()

    # -- generation ------------------------------------------------------------

    def _gap(self) -> float:
        if math.isinf(self._mean_gap):
            return math.inf
        return self._rng.gammavariate(self._shape, self._mean_gap / self._shape)

    def in_outage(self, now: float | None = None) -> bool:
        t = self._clock() if now is None else now
        return any(lo <= t < hi for lo, hi in self._outages)

    def _advance(self, now: float) -> None:
        """Let every block due by ``now`` arrive."""
        while self._next <= now:
            t = self._next
            if self.stored_bits >= self.capacity_bits:
                # Full: every block until now is dropped. Skip them in one
                # step (exact for exponential gaps, see the module docstring).
                missed = (now - t) / self._mean_gap + 1.0
                self.generated_bits += int(missed * self.block_bits)
                self.dropped_bits += int(missed * self.block_bits)
                self.blocks += int(missed)
                self._next = now + self._gap()
                return
            self._next = t + self._gap()
            if self.in_outage(t):
                continue  # the quantum channel is down: nothing distilled
            self.blocks += 1
            self.generated_bits += self.block_bits
            kept = min(self.block_bits, self.capacity_bits - self.stored_bits)
            self.stored_bits += kept
            self.dropped_bits += self.block_bits - kept

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, end, key_id = self._expiry.popleft()
            if self._pending[end].pop(key_id, None) is not None:
                self.expired_keys += 1

    def _bound_pending(self) -> None:
        # Issued keys nobody takes are memory: beyond MAX_PENDING the oldest
        # are forgotten early, as a device with a full issued-key buffer would.
        pending = self._pending
        while len(pending["alice"]) + len(pending["bob"]) > MAX_PENDING and self._expiry:
            _, end, key_id = self._expiry.popleft()
            if pending[end].pop(key_id, None) is not None:
                self.expired_keys += 1

    def tick(self) -> float:
        """Catch up to now; returns now."""
        now = self._clock()
        self._advance(now)
        self._expire(now)
        return now

    def stored_key_count(self, key_size: int | None = None) -> int:
        """ETSI 014 Status stored_key_count: whole keys of ``key_size`` in the store."""
        self.tick()
        return self.stored_bits // (key_size or self.link.key_size)

    # -- ETSI 014 operations ---------------------------------------------------------

    def issue(self, at: End, master: str, slave: str, number: int, size: int) -> list[Key]:
        """Get key at end ``at``: take ``number`` keys of ``size`` bits from the store.

        The keys leave the store for good (clause 5.2 post-condition) and wait
        at the other end for ``slave`` to take them by ID. Too little stored
        is a 503 (spec note 5.8) and consumes nothing.
        """
        if size <= 0 or size % 8 or number <= 0:
            raise ValueError("the emulator issues whole-byte keys (validated by kme.etsi014)")
        now = self.tick()
        need = number * size
        if need > self.stored_bits:
            raise etsi014.insufficient_key(
                cause=f"{need} bits asked, {self.stored_bits} stored")
        nbytes = size // 8
        raw = self._urandom(nbytes * number)
        self.stored_bits -= need
        self.delivered_bits += need
        keys: list[Key] = []
        waiting = self._pending[_OTHER[at]]
        expires = now + self._ttl
        for i in range(number):
            key_id = uuid.uuid4()
            material = raw[i * nbytes:(i + 1) * nbytes]
            waiting[key_id] = _Issued(material, size, master, slave, expires)
            self._expiry.append((expires, _OTHER[at], key_id))
            keys.append(Key(key_id, SecretBytes(material), size))
        self._bound_pending()
        return keys

    def take(self, at: End, master: str, slave: str, key_ids: Sequence[uuid.UUID]) -> list[Key]:
        """Get key with key IDs at end ``at``: all of them, once, or none (clause 5.4)."""
        self.tick()
        waiting = self._pending[at]
        found: list[tuple[uuid.UUID, _Issued]] = []
        for key_id in key_ids:
            item = waiting.get(key_id)
            # A wrong master reveals nothing: the same 400 as an unknown ID
            # (spec note section 6).
            if item is None or item.master != master:
                raise etsi014.keys_not_found(cause=f"{key_id} not pending at {at}")
            if item.slave != slave:
                raise etsi014.permission_denied(cause=f"{key_id} was issued for another slave")
            found.append((key_id, item))
        for key_id, _ in found:
            del waiting[key_id]
        return [Key(key_id, SecretBytes(item.material), item.size_bits)
                for key_id, item in found]

    def stats(self, *, catch_up: bool = True) -> StreamStats:
        """The counters; ``catch_up=False`` reads them as of the last :meth:`tick`."""
        if catch_up:
            self.tick()
        return StreamStats(self.generated_bits, self.dropped_bits, self.delivered_bits,
                           self.stored_bits, self.blocks,
                           {end: len(p) for end, p in self._pending.items()},
                           self.expired_keys)
