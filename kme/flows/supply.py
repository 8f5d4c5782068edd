"""Key supply meets demand (issue 11): quotas, the measured supply, and bounded waits.

Three parts, all in the relay process (one per node, so one view of the
node's devices and one queue per link):

- :class:`Quotas`: token buckets on key bits per master SAE and per (master,
  slave) pair. A request over its quota is refused at once with OVER_QUOTA
  and the seconds until its bits are back (the 014 answer's Retry-After);
  the bits of a request that fails later are given back.
- :class:`Supply`: per QKD link, the device's ``stored_key_count`` and the
  measured rate at which the device makes key ((stored bits now - then + bits
  drawn meanwhile) / elapsed), read by one thread: every ``poll_ms`` while
  requests wait or stocks fill, every second otherwise.
- The wait queue, per link, also in :class:`Supply`. A Get key that finds too
  little key on its device (or finds others already waiting) waits for its
  turn, up to its budget. Turns are given when the poller sees key arrive, in
  deficit round robin over master SAEs (each active SAE earns
  ``quantum_bits`` per round and is served while its head request fits), so
  under scarcity no SAE drains the link for the others. An SAE served while
  others compete *rests* for up to REST_S: it keeps its place and earns its
  credit, and once it is owed a request the rounds stop for it, so a client
  that asks again as soon as it is answered (one request at a time) is not
  outrun by one that keeps many requests queued. A waiter sleeps on
  its own event, set only by a grant or by closing: no waiter polls. After
  the budget it fails with INSUFFICIENT_KEY and a Retry-After from the key
  ahead of it and the measured rate.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kme import metrics
from kme.config import QuotaSettings, SupplySettings
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import Status

__all__ = ["LinkReading", "Quotas", "Supply", "TokenBucket", "Turn", "drr_grants",
           "jain_index"]

# Slowest poll of a device while nothing waits on it (the rate stays measured).
IDLE_POLL_S = 1.0
# The measured rate is over about this long.
RATE_WINDOW_S = 10.0
# How long an SAE served under competition keeps its place in the rounds while it
# asks again (a client that waits for each answer is away for one round trip).
REST_S = 0.25


class TokenBucket:
    """``rate`` bits per second, up to ``burst`` bits; thread-safe."""

    def __init__(self, rate_bps: float, burst_bits: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_bps
        self.burst = float(burst_bits)
        self._tokens = float(burst_bits)
        self._clock = clock
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, bits: int) -> float:
        """Take ``bits`` and return 0, or take nothing and return the seconds until they fit."""
        with self._lock:
            self._refill()
            if bits <= self._tokens:
                self._tokens -= bits
                return 0.0
            if bits > self.burst or self.rate <= 0:
                return math.inf
            return (bits - self._tokens) / self.rate

    def give_back(self, bits: int) -> None:
        with self._lock:
            self._refill()
            self._tokens = min(self.burst, self._tokens + bits)

    def level(self) -> float:
        with self._lock:
            self._refill()
            return self._tokens


class Quotas:
    """Per master SAE and per (master, slave) pair buckets, as the node file sets them."""

    def __init__(self, quotas: Sequence[QuotaSettings],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._by_sae: dict[str, TokenBucket] = {}
        self._by_pair: dict[tuple[str, str], TokenBucket] = {}
        for q in quotas:
            bucket = TokenBucket(q.rate_bps, q.burst_bits, clock)
            if q.slave is None:
                self._by_sae[q.sae] = bucket
            else:
                self._by_pair[(q.sae, q.slave)] = bucket

    def _buckets(self, master: str, slaves: Sequence[str]) -> list[tuple[str, TokenBucket]]:
        found = [(f"SAE {master!r}", b) for b in [self._by_sae.get(master)] if b is not None]
        for s in slaves:
            pair = self._by_pair.get((master, s))
            if pair is not None:
                found.append((f"the SAE pair {master}->{s}", pair))
        return found

    def charge(self, master: str, slaves: Sequence[str], bits: int) -> Callable[[], None]:
        """Take ``bits`` from every bucket that applies, or raise OVER_QUOTA taking none.

        Returns the refund for a request that fails after this.
        """
        taken: list[TokenBucket] = []
        for name, bucket in self._buckets(master, slaves):
            wait = bucket.take(bits)
            if wait > 0:
                for b in taken:
                    b.give_back(bits)
                if math.isinf(wait):
                    raise KmstnError(ErrorCode.OVER_QUOTA,
                                     f"{name} may take at most {int(bucket.burst)} key bits at "
                                     f"once; ask for fewer keys", reason="over_quota")
                raise KmstnError(
                    ErrorCode.OVER_QUOTA,
                    f"{name} is over its key quota of {bucket.rate:g} bits/s; "
                    f"retry in {math.ceil(wait)} s", reason="over_quota",
                    retry_after_s=max(1, math.ceil(wait)))
            taken.append(bucket)

        def refund() -> None:
            for b in taken:
                b.give_back(bits)

        return refund


# -- the measured supply and the wait queue ------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkReading:
    stored_keys: int
    key_size: int
    rate_bps: float  # measured; 0 until two readings
    max_keys: int = 0  # the device's max_key_count (0: unknown)

    @property
    def nearly_full(self) -> bool:
        """A (nearly) full store drops the key its device makes: using it costs nothing."""
        return self.max_keys > 0 and self.stored_keys >= 0.9 * self.max_keys


@dataclass(eq=False)
class Turn:
    """One request waiting for key on one link."""

    sae: str
    keys: int
    bits: int
    event: threading.Event = field(default_factory=threading.Event)
    granted: bool = False
    closed: bool = False


def drr_grants(queues: Mapping[str, collections.deque[Turn]], order: collections.deque[str],
               deficit: dict[str, int], available: int, quantum: int,
               resting: dict[str, tuple[int, int]] | None = None) -> list[Turn]:
    """Deficit round robin: which waiting turns ``available`` keys serve now, in order.

    ``order`` is the round robin of SAEs with waiting turns; ``deficit`` their
    credit in bits. Both are updated; granted turns are removed from their
    queue. An SAE whose head needs more keys than are left keeps its credit
    and its place; the rounds stop when no head fits the keys left.

    ``resting`` (SAE -> (bits, keys) of its last request), when given: SAEs
    without a waiting turn that keep their place because they were served
    while others competed and are expected back (the caller ends a rest
    after a while). When the key at hand cannot serve every waiting turn and
    every resting SAE's next request, the rounds are held for a resting SAE
    at its place: it is credited its round (up to its last request), and the
    rest waits until it is back or its rest ends. An SAE back with credit for
    its head is served at once (it was owed from a round it missed). An SAE
    whose queue empties here while another SAE has a place starts resting.
    """
    granted: list[Turn] = []

    def serve(sae: str, q: collections.deque[Turn]) -> None:
        nonlocal available
        while q and q[0].bits <= deficit.get(sae, 0) and q[0].keys <= available:
            turn = q.popleft()
            deficit[sae] -= turn.bits
            available -= turn.keys
            granted.append(turn)
            if not q and resting is not None and len(order) > 1:
                resting[sae] = (max(quantum, turn.bits), turn.keys)

    def leave_if_idle(sae: str) -> None:
        if not queues[sae] and (resting is None or sae not in resting):
            # An SAE that stops waiting keeps no credit (DRR).
            deficit.pop(sae, None)
            order.remove(sae)

    for sae in list(order):  # owed from a round it missed while resting
        if queues[sae] and deficit.get(sae, 0) >= queues[sae][0].bits:
            serve(sae, queues[sae])
    demand = (sum(t.keys for s in order for t in queues[s])
              + sum(keys for s, (_, keys) in (resting or {}).items() if not queues[s]))
    hold = resting is not None and demand > available
    while available > 0 and order:
        if not any(queues[s] and queues[s][0].keys <= available for s in order):
            break
        for _ in range(len(order)):
            sae = order[0]
            q = queues[sae]
            if not q and resting is not None and sae in resting:
                if hold:
                    owed_bits = resting[sae][0]
                    if deficit.get(sae, 0) >= owed_bits:
                        return granted  # owed its next request: the rest is held for it
                    deficit[sae] = min(owed_bits, deficit.get(sae, 0) + quantum)
                    if deficit[sae] >= owed_bits:
                        order.rotate(-1)  # credited its round: the next one starts after it
                        return granted
                order.rotate(-1)
                continue
            deficit[sae] = deficit.get(sae, 0) + quantum
            serve(sae, q)
            order.rotate(-1)
            leave_if_idle(sae)
            if available <= 0:
                break
    return granted


class _Link:
    def __init__(self, link_id: str, key_size: int) -> None:
        self.link_id = link_id
        self.key_size = key_size
        self.samples: collections.deque[tuple[float, float]] = collections.deque()
        self.reading: LinkReading | None = None
        self.queues: dict[str, collections.deque[Turn]] = collections.defaultdict(
            collections.deque)
        self.order: collections.deque[str] = collections.deque()
        self.deficit: dict[str, int] = {}
        # SAEs resting in the rounds (see drr_grants): their last request, and until when.
        self.resting: dict[str, tuple[int, int]] = {}
        self.rest_until: dict[str, float] = {}
        # Keys granted to turns that have not drawn yet (so one reading is not
        # handed out twice).
        self.promised = 0
        self.busy = 0  # turns granted and still drawing

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def stop_resting(self, sae: str) -> None:
        self.resting.pop(sae, None)
        self.rest_until.pop(sae, None)

    def forget_if_idle(self, sae: str) -> None:
        """An SAE with no waiting turn leaves the rounds, and its credit with it."""
        if not self.queues.get(sae):
            self.queues.pop(sae, None)
            self.deficit.pop(sae, None)
            if sae in self.order:
                self.order.remove(sae)


class Supply:
    """The measured supply of each QKD link of this node, and the requests waiting on it."""

    def __init__(self, settings: SupplySettings, status_of: Mapping[str, Callable[[], Status]],
                 taken_bits: Callable[[str], int], log: logging.Logger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._status_of = dict(status_of)
        self._taken_bits = taken_bits
        self._log = log
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._links = {lid: _Link(lid, 0) for lid in status_of}
        self._listeners: list[Callable[[str, LinkReading], None]] = []
        self._busy_links: set[str] = set()  # links a stock is filling from
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="supply-poll", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._links:
            self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            for link in self._links.values():
                for q in link.queues.values():
                    for turn in q:
                        turn.closed = True
                        turn.event.set()
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def on_reading(self, listener: Callable[[str, LinkReading], None]) -> None:
        """Call ``listener(link_id, reading)`` after every device reading (stocks refill)."""
        self._listeners.append(listener)

    def want_fast_polls(self, link_id: str, on: bool) -> None:
        """A stock is waiting for key on ``link_id``: read its device often."""
        with self._wake:
            if on and link_id not in self._busy_links:
                self._busy_links.add(link_id)
                self._wake.notify_all()
            elif not on:
                self._busy_links.discard(link_id)

    # -- readings ---------------------------------------------------------------------------

    def reading(self, link_id: str) -> LinkReading | None:
        with self._lock:
            link = self._links.get(link_id)
            return None if link is None else link.reading

    def waiting(self, link_id: str) -> int:
        """Requests waiting for key on ``link_id`` (granted ones still drawing included)."""
        with self._lock:
            link = self._links.get(link_id)
            return 0 if link is None else link.waiting() + link.busy

    def observe(self, link_id: str, stored_keys: int, key_size: int, max_keys: int = 0
                ) -> LinkReading:
        """One device reading: update the rate, give turns for the key that is there."""
        now = self._clock()
        with self._wake:
            link = self._links[link_id]
            link.key_size = key_size
            inflow = stored_keys * key_size + self._taken_bits(link_id)
            link.samples.append((now, inflow))
            while len(link.samples) > 2 and now - link.samples[1][0] >= RATE_WINDOW_S:
                link.samples.popleft()
            rate = 0.0
            if len(link.samples) >= 2 and now > link.samples[0][0]:
                t0, v0 = link.samples[0]
                rate = max(0.0, (inflow - v0) / (now - t0))
            link.reading = LinkReading(stored_keys, key_size, rate, max_keys)
            self._dispatch(link, stored_keys)
            reading = link.reading
            metrics.SUPPLY_WAITING.labels(link_id).set(link.waiting())
        for listener in self._listeners:
            try:
                listener(link_id, reading)
            except Exception:
                self._log.exception("supply listener crashed", extra={"link_id": link_id})
        return reading

    def _dispatch(self, link: _Link, stored: int) -> None:
        now = self._clock()
        for sae in [s for s, until in link.rest_until.items() if until <= now]:
            link.stop_resting(sae)  # it did not come back in time
            link.forget_if_idle(sae)
        available = stored - link.promised
        for turn in drr_grants(link.queues, link.order, link.deficit, available,
                               self.settings.quantum_bits, link.resting):
            turn.granted = True
            link.promised += turn.keys
            link.busy += 1
            turn.event.set()
        for sae in link.resting:
            link.rest_until.setdefault(sae, now + REST_S)

    # -- waiting ----------------------------------------------------------------------------

    def must_queue(self, link_id: str) -> bool:
        """Whether a new request must wait behind others (fair order) before drawing."""
        with self._lock:
            link = self._links.get(link_id)
            now = self._clock()
            return link is not None and (
                link.waiting() > 0 or link.promised > 0
                or any(until > now for until in link.rest_until.values()))

    def wait_turn(self, link_id: str, sae: str, keys: int, bits: int, until: float,
                  front: bool = False) -> Turn:
        """Wait until key for this request arrived and it is its turn; then it may draw.

        Raises INSUFFICIENT_KEY with Retry-After when ``until`` (monotonic)
        passes first. ``front``: a turn whose draw found too little key after
        all goes back to the head of its SAE's queue.
        """
        turn = Turn(sae, keys, bits)
        with self._wake:
            link = self._links[link_id]
            queue = link.queues[sae]
            if front:
                queue.appendleft(turn)
            else:
                queue.append(turn)
            link.stop_resting(sae)  # back, if it rested: it keeps its place and credit
            if sae not in link.order:
                link.order.append(sae)
            if link.reading is not None:  # key may be there already
                self._dispatch(link, link.reading.stored_keys)
            self._wake.notify_all()  # the poller switches to fast polls
        left = until - self._clock()
        if left > 0:
            turn.event.wait(left)
        with self._wake:
            if turn.granted:
                return turn
            for q in link.queues.values():
                if turn in q:
                    q.remove(turn)
            link.forget_if_idle(sae)
            ahead = sum(t.bits for q in link.queues.values() for t in q)
            reading = link.reading
        if turn.closed:
            raise KmstnError(ErrorCode.UNAVAILABLE, "the node is shutting down")
        raise KmstnError(ErrorCode.INSUFFICIENT_KEY,
                         "not enough QKD key material on the device within the wait budget",
                         retry_after_s=self.retry_after(ahead + bits, reading),
                         cause=f"link {link_id}, {ahead} bits queued ahead")

    def done(self, link_id: str, turn: Turn) -> None:
        """A granted turn drew (or gave up): its promised keys are no longer held back."""
        with self._wake:
            link = self._links[link_id]
            if turn.granted:
                link.promised = max(0, link.promised - turn.keys)
                link.busy = max(0, link.busy - 1)
                turn.granted = False

    def drew(self, link_id: str, keys: int | None = None) -> None:
        """This node drew ``keys`` from the device (None: a draw found too little key), so
        the last reading overstates what is left until the next one."""
        with self._wake:
            link = self._links.get(link_id)
            if link is None or link.reading is None:
                return
            left = 0 if keys is None else max(0, link.reading.stored_keys - keys)
            link.reading = LinkReading(left, link.reading.key_size, link.reading.rate_bps,
                                       link.reading.max_keys)

    def retry_after(self, bits: int, reading: LinkReading | None) -> int:
        """Seconds until the measured rate makes ``bits`` (at least 1)."""
        rate = reading.rate_bps if reading is not None else 0.0
        if rate <= 0:
            return max(1, math.ceil(self.settings.wait_ms / 1000) or 1)
        return max(1, math.ceil(bits / rate))

    # -- the poller ---------------------------------------------------------------------------

    def poll_once(self, link_ids: Sequence[str] | None = None) -> None:
        for link_id in link_ids or list(self._links):
            try:
                st = self._status_of[link_id]()
            except KmstnError as exc:
                self._log.debug("supply: device status failed", extra={
                    "link_id": link_id, "error_code": exc.code.name})
                continue
            self.observe(link_id, int(st.stored_key_count), int(st.key_size),
                         int(st.max_key_count))

    def _run(self) -> None:
        fast = max(self.settings.poll_ms, 5) / 1000
        last_idle = 0.0
        while True:
            with self._wake:
                if self._stop:
                    return
                hot = [lid for lid, link in self._links.items()
                       if link.waiting() or lid in self._busy_links]
            now = self._clock()
            if now - last_idle >= IDLE_POLL_S:
                self.poll_once()
                last_idle = now
            elif hot:
                self.poll_once(hot)
            with self._wake:
                hot_now = any(link.waiting() for link in self._links.values()) or bool(
                    self._busy_links)
                if not self._stop:
                    self._wake.wait(fast if hot_now else IDLE_POLL_S)


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1 when all are equal."""
    if not values or not any(values):
        return float("nan")
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))
