"""Key stocks (issue 11): keys relayed ahead, held at both ends, handed out without a relay.

A stock belongs to one destination KMSTN and one (master, slave) pair of
the node file's ``[[supply.stocks]]``. A fill is an ordinary delivery of a
batch of keys for that master and slave (ext_keys hop by hop, or a
device-keys notice to a QKD neighbour), so the slave's node keeps each key
for exactly that slave, as for any relayed key: the fill's own message is
what tells the slave's node which SAE may take the key, and no key may be
taken by an SAE not named. Here the keys wait in the keyvault until the
master asks; Get key then takes them from the stock with no relay on the
request path, and they are already retrievable at the slave (confirmed mode
holds: a stocked key is *ready* only once the destination acknowledged it).

Both ends agree across crashes:

- a fill's keys are recorded *pending* here before the fill leaves, and
  settled *ready* after the destination's ack; a failed fill, and every
  pending key found at start (a crash cut its fill), is voided at the
  destination by a durable void job and deleted here;
- a take marks keys *handed* (bytes deleted) in the transaction that returns
  them, so every key the destination holds for the pair is either ready here
  or was handed to the master;
- a ready key older than the stock's ``ttl_s`` is voided at the destination
  and deleted here (the destination's own key TTL is longer).

Fills run on one thread, within ``share`` of the source link's measured
rate (a token bucket), only while no Get key waits for that link, and only
from key the device already holds; key from a nearly full device store,
which would drop it, is taken without counting against the share. A stock
is topped up once it has room for a whole batch (or is empty), so a stock
in use costs one relay per ``batch`` keys, not one per key taken. A second
thread keeps the few keys of each stock taken ahead into memory, so a Get
key never waits for a fill.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kme import metrics
from kme.config import StockSettings
from kme.errors import ErrorCode, KmstnError
from kme.flows.context import Context
from kme.flows.delivery import Delivery, Placement
from kme.flows.northbound import Source, draw, source_of
from kme.flows.ports import StockVault
from kme.flows.supply import LinkReading, Supply, TokenBucket
from kme.types import Deadline, Key, NodeId, StockEntry, StockId

__all__ = ["StockPlan", "Stocks", "stock_plans"]

# How often stocks are checked for expiry and for keys to top up without a reading.
CHECK_S = 5.0
# Keys per stock taken from the keyvault ahead of Get key (marked handed there),
# so a Get key from a stock makes no keyvault call. A crash of the relay loses
# these few: they stay handed here and unclaimed at the destination until its
# key TTL, never delivered twice. Only a stock in use (a Get key took from it in
# the last AHEAD_MAX_AGE_S) has keys taken ahead, and they are topped up once
# fewer than half are left: waking the take-ahead thread on every Get key cost
# the request about a millisecond (the woken thread competes for the
# interpreter while the answer is on its way out; SAE1->SAE2 enc_keys p50
# 3.4-4.6 ms with a wake per key, 2.3-2.7 ms with one per eight).
AHEAD = 16
AHEAD_LOW = AHEAD // 2
# How often handed entries past their expiry are forgotten.
HANDED_CHECK_S = 60.0
# A key taken ahead and not asked for within this long goes back: it is voided at
# its destination (it may be near its stock's ttl_s already).
AHEAD_MAX_AGE_S = 60.0
# After a failed fill a stock waits this long before the next, doubling up to the max.
FILL_BACKOFF_S = 0.5
FILL_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class StockPlan:
    stock: StockId
    settings: StockSettings


def stock_plans(stocks: Sequence[StockSettings]) -> list[StockPlan]:
    return [StockPlan(StockId(s.destination, master, (slave,)), s)
            for s in stocks for master, slave in s.pairs]


class Stocks:
    """Fills, hands out and expires this node's key stocks."""

    def __init__(self, ctx: Context, delivery: Delivery, supply: Supply, vault: StockVault,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ctx = ctx
        self._delivery = delivery
        self._supply = supply
        self._vault = vault
        self._clock = clock
        self._log: logging.Logger = ctx.log
        self.plans = {p.stock: p for p in stock_plans(ctx.config.supply.stocks)}
        self._levels: dict[StockId, int] = dict.fromkeys(self.plans, 0)
        # Keys taken ahead, with the (monotonic) time they were taken.
        self._ahead: dict[StockId, collections.deque[tuple[float, Key]]] = {
            s: collections.deque() for s in self.plans}
        self._last_take: dict[StockId, float] = {}  # monotonic time of the last Get key
        self._buckets: dict[str, TokenBucket] = {}
        self._backoff: dict[StockId, tuple[float, float]] = {}  # (not before, last wait)
        self._next_handed_check = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name="stock-fill", daemon=True),
                         threading.Thread(target=self._run_ahead, name="stock-ahead",
                                          daemon=True)]
        supply.on_reading(self._on_reading)
        for stock in self.plans:  # read when scraped, so a Get key does no metrics work
            metrics.STOCK_KEYS.labels(str(stock)).set_function(
                functools.partial(self.level, stock))

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self.plans:
            for thread in self._threads:
                thread.start()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=10)

    def _on_reading(self, link_id: str, reading: LinkReading) -> None:
        with self._wake:
            self._wake.notify_all()

    # -- Get key from a stock -------------------------------------------------------------

    def plan_for(self, master: str, slaves: Sequence[str], size: int) -> StockPlan | None:
        if len(slaves) != 1:
            return None
        for plan in self.plans.values():
            if (plan.stock.master == master and plan.stock.slaves == (slaves[0],)
                    and plan.settings.key_size == size):
                return plan
        return None

    def take(self, plan: StockPlan, number: int) -> list[Key] | None:
        """``number`` keys from the stock, or None when it holds fewer (nothing taken)."""
        with self._wake:
            self._last_take[plan.stock] = self._clock()
            ahead = self._ahead[plan.stock]
            if number <= len(ahead):
                keys = [ahead.popleft()[1] for _ in range(number)]
                if len(ahead) < AHEAD_LOW:
                    self._wake.notify_all()  # take more ahead
                return keys
            if self._levels[plan.stock] < number:
                return None  # the keyvault holds too few as well: no call to learn it
        try:
            keys = self._vault.stock_take(plan.stock, number, plan.settings.key_size)
        except KmstnError as exc:
            if exc.code is not ErrorCode.INSUFFICIENT_KEY:
                raise
            return None
        with self._wake:
            self._levels[plan.stock] = max(0, self._levels[plan.stock] - len(keys))
            self._wake.notify_all()  # top it up
        return keys

    def level(self, stock: StockId) -> int:
        """Keys ready in the stock: in the keyvault, and taken ahead here."""
        with self._lock:
            return self._levels.get(stock, 0) + len(self._ahead.get(stock, ()))

    def levels(self) -> dict[StockId, int]:
        with self._lock:
            return {s: n + len(self._ahead[s]) for s, n in self._levels.items()}

    def _wants_ahead(self, stock: StockId) -> int:
        """Keys to take ahead for ``stock`` now (with the lock held): none while it is
        not in use, so an idle stock holds nothing in memory and wastes no key."""
        in_use = self._clock() - self._last_take.get(stock, -AHEAD_MAX_AGE_S) < AHEAD_MAX_AGE_S
        return min(AHEAD - len(self._ahead[stock]), self._levels[stock]) if in_use else 0

    def take_ahead(self) -> None:
        """Keep up to AHEAD keys of each stock in use in memory, taken from the keyvault;
        keys held longer than AHEAD_MAX_AGE_S are voided."""
        for stock, plan in self.plans.items():
            with self._lock:
                ahead = self._ahead[stock]
                stale = []
                while ahead and self._clock() - ahead[0][0] > AHEAD_MAX_AGE_S:
                    stale.append(ahead.popleft()[1])
            if stale:
                self._delivery.void_everywhere(
                    Placement.of(stale, stock.master, {NodeId(stock.destination): stock.slaves},
                                 None, None), {}, Deadline.after(0))
            with self._lock:
                want = self._wants_ahead(stock)
            if want <= 0:
                continue
            try:
                keys = self._vault.stock_take(stock, want, plan.settings.key_size)
            except KmstnError as exc:
                if exc.code is not ErrorCode.INSUFFICIENT_KEY:
                    raise
                with self._lock:
                    self._levels[stock] = 0  # fewer than counted: recover() counts again
                continue
            with self._wake:
                now = self._clock()
                self._ahead[stock].extend((now, k) for k in keys)
                self._levels[stock] = max(0, self._levels[stock] - len(keys))

    # -- start, expiry ----------------------------------------------------------------------

    def recover(self) -> int:
        """At start and then every few seconds: settle what a crash or time left behind.

        Pending keys (a fill cut short), expired ready keys, and keys of a
        stock no longer configured are voided at their destination (a durable
        job each, recorded before the keys are deleted here); handed keys past
        their expiry are forgotten. Returns the number of keys voided.
        """
        now = dt.datetime.now(dt.UTC)
        # Handed keys (kept only so both ends can be compared) are looked at
        # once a minute: there may be many, and only their expiry matters.
        look_at_handed = self._clock() >= self._next_handed_check
        if look_at_handed:
            self._next_handed_check = self._clock() + HANDED_CHECK_S
        entries = self._vault.stock_list(
            states=() if look_at_handed else ("pending", "ready"))
        void: dict[StockId, list[StockEntry]] = {}
        forget: list[StockEntry] = []
        levels = dict.fromkeys(self.plans, 0)
        for e in entries:
            if e.state == "handed":
                if e.expires_at <= now:
                    forget.append(e)
            elif e.state == "pending" or e.expires_at <= now or e.stock not in self.plans:
                void.setdefault(e.stock, []).append(e)
            else:
                levels[e.stock] += 1
        for stock, items in void.items():
            ids = tuple(e.key_id for e in items)
            p = Placement(ids, items[0].size_bits, stock.master,
                          {NodeId(stock.destination): stock.slaves})
            self._delivery.void_everywhere(p, {}, Deadline.after(0))
            self._vault.stock_settle(ids, ready=False)
        if forget:
            self._vault.stock_settle([e.key_id for e in forget], ready=False)
        with self._wake:
            self._levels = levels
            self._wake.notify_all()
        voided = sum(len(v) for v in void.values())
        if voided:
            self._log.warning("stock keys voided at their destination", extra={
                "stocks": {str(s): len(v) for s, v in void.items()}})
        return voided

    # -- fills ----------------------------------------------------------------------------

    def _bucket(self, link_id: str, plan: StockPlan, reading: LinkReading | None) -> TokenBucket:
        """The fill budget of one link: ``share`` of its measured rate (configured until
        measured), a burst of one batch."""
        link = self._ctx.config.topology.link(link_id)
        rate = reading.rate_bps if reading is not None and reading.rate_bps > 0 else float(
            getattr(link, "secret_key_rate", 0.0))
        bucket = self._buckets.get(link_id)
        burst = plan.settings.batch * plan.settings.key_size
        if bucket is None:
            bucket = self._buckets[link_id] = TokenBucket(plan.settings.share * rate, burst,
                                                          self._clock)
        bucket.rate = plan.settings.share * rate
        bucket.burst = max(bucket.burst, float(burst))
        return bucket

    def fill_once(self) -> bool:
        """Top up the emptiest stock by one batch if its link allows; whether a fill ran.

        A stock wants a fill once it has room for a whole batch (an empty one always has).
        """
        levels = self.levels()
        wanting = sorted(((levels[s] / p.settings.keys, s) for s, p in self.plans.items()
                          if p.settings.keys - levels[s] >= min(p.settings.batch,
                                                                 p.settings.keys)),
                         key=lambda item: item[0])
        for _, stock in wanting:
            plan = self.plans[stock]
            dest = NodeId(stock.destination)
            try:
                source = source_of(self._ctx.config, self._ctx.routes, [dest])
                if dest not in (source.direct,):
                    self._ctx.routes.route_to_node(dest)
            except KmstnError:
                continue  # no path now: the next check tries again
            if source.link is None:
                continue  # stocks save QKD key; a CSPRNG node needs none
            link_id = source.link.id
            if self._supply.waiting(link_id):
                continue  # Get key requests wait for this link: they come first
            reading = self._supply.reading(link_id)
            size = plan.settings.key_size
            per_key = max(1, size // reading.key_size) if reading and reading.key_size else 1
            room = plan.settings.keys - self.level(stock)
            held = (reading.stored_keys // per_key) if reading is not None else 0
            number = min(plan.settings.batch, room, held,
                         source.link.max_key_per_request)
            if number <= 0:
                self._supply.want_fast_polls(link_id, True)
                continue
            bucket = self._bucket(link_id, plan, reading)
            # Key a full store would drop is free; otherwise fills keep to their share.
            if not (reading is not None and reading.nearly_full) and bucket.take(
                    number * size) > 0:
                self._supply.want_fast_polls(link_id, True)
                continue
            self._supply.want_fast_polls(link_id, False)
            if self._clock() < self._backoff.get(stock, (0.0, 0.0))[0]:
                continue  # its last fill failed: the path is given time to come back
            if self._fill(plan, source, number):
                self._backoff.pop(stock, None)
                return True
            _, last = self._backoff.get(stock, (0.0, 0.0))
            wait = min(FILL_BACKOFF_MAX_S, max(FILL_BACKOFF_S, 2 * last))
            self._backoff[stock] = (self._clock() + wait, wait)
        return False

    def _fill(self, plan: StockPlan, source: Source, number: int) -> bool:
        """One fill of ``number`` keys; whether the destination acknowledged it."""
        assert source.link is not None  # noqa: S101 - fill_once checked it
        ctx = self._ctx
        stock = plan.stock
        dest = NodeId(stock.destination)
        device = ctx.devices.for_link(source.link.id)
        try:
            keys = draw(device, number, plan.settings.key_size,
                        for_neighbour=source.direct is not None)
        except KmstnError as exc:
            self._supply.drew(source.link.id)
            self._log.debug("stock fill found too little key", extra={
                "stock": str(stock), "error_code": exc.code.name})
            return False
        self._supply.drew(source.link.id, number)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=plan.settings.ttl_s)
        self._vault.stock_put(stock, keys, expires)  # pending: never handed out yet
        p = Placement.of(keys, stock.master, {dest: stock.slaves}, source.link.id,
                         source.direct)
        deadline = Deadline.after(ctx.relay_timeout)
        try:
            self._delivery.to_destination(p, dest, deadline)
        except KmstnError as exc:
            self._delivery.void_everywhere(p, {dest: exc}, deadline)
            self._vault.stock_settle(p.key_ids, ready=False)
            self._log.warning("stock fill failed", extra={
                "stock": str(stock), "error_code": exc.code.name, "error": exc.public})
            return False
        self._vault.stock_settle(p.key_ids, ready=True)
        with self._wake:
            self._levels[stock] = self._levels.get(stock, 0) + len(keys)
            self._wake.notify_all()  # keys to take ahead
        self._log.info("stock filled", extra={"stock": str(stock), "keys": len(keys),
                                               "stock_level": self.level(stock)})
        return True

    def _run(self) -> None:
        next_check = 0.0
        while True:
            with self._wake:
                if self._stop:
                    return
            now = self._clock()
            try:
                if now >= next_check:
                    self.recover()
                    next_check = now + CHECK_S
                filled = self.fill_once()
            except KmstnError as exc:  # the keyvault or a neighbour is away: later
                self._log.warning("stock upkeep failed", extra={
                    "error_code": exc.code.name, "error": exc.public})
                filled = False
            except Exception:
                self._log.exception("stock upkeep crashed")
                filled = False
            if filled:
                continue
            with self._wake:
                self._wake.wait(min(CHECK_S, max(0.01, next_check - self._clock())))

    def _run_ahead(self) -> None:
        """Keep keys taken ahead: when a take leaves fewer than AHEAD_LOW, and every
        CHECK_S (keys held too long go back)."""
        while not self._stopping():
            try:
                self.take_ahead()
            except KmstnError as exc:  # the keyvault is away: later
                self._log.warning("stock keys could not be taken ahead", extra={
                    "error_code": exc.code.name, "error": exc.public})
            except Exception:
                self._log.exception("stock take-ahead crashed")
            with self._wake:
                if not self._stop and not any(self._wants_ahead(s) > 0 for s in self.plans):
                    self._wake.wait(CHECK_S)

    def _stopping(self) -> bool:
        with self._lock:
            return self._stop
