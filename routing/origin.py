"""This node's own link-state record: from what the relay observes to what the node announces.

The relay reports, a few times a second, which neighbours answer hellos and
how each QKD device is doing (reachable, key made per second, key stored).
:class:`Originator` turns that into what the node announces per link: up or
down, and a cost. It signs a new record only when the announcement changes in
a way that should change routes, so that routes follow capacity without
flapping (dkms reports that routing on raw pool levels made routes flap and
links run dry; this routes on a smoothed key rate, never on pool levels):

* **Down at once, up after a hold.** A link whose neighbour stops answering,
  or whose device stops answering, is announced down in the next record. One
  that was down is announced up again only after ``up_hold_s`` of being
  healthy throughout (a link seen for the first time is up at once).
* **Cost from capacity, smoothed.** A PQC (or site) link costs what is
  configured. A QKD link costs its configured cost times
  ``nominal rate / measured rate``, clamped to [1, ``max_cost_factor``]: at or
  above the rate it was configured with it costs its configured cost, at a
  tenth of it ten times that. The measured rate is an exponentially weighted
  average (time constant ``rate_tau_s``) of the device poller's rate, which
  counts the key the device made whether or not anyone drew it; samples taken
  while the device's store is full are skipped (a full store makes no key,
  which says nothing about the link).
* **Hysteresis.** A new cost is announced only when it differs from the one
  announced by at least ``cost_hysteresis`` (a factor), and at most once per
  ``min_cost_interval_s``. Up/down changes are not delayed by this.
* **Refresh.** A record is signed again every ``refresh_s`` even without a
  change, well inside its ``lifetime_s``, so records of nodes that died age
  out while live ones never do.

Sequence numbers are strictly increasing across restarts without being
stored: a record's sequence is at least the wall clock in milliseconds, and
above any record of this node seen in the network (a previous run's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from kme.config import LinkKindName, LinkStateSettings
from kme.types import NodeId, SaeId
from routing.records import AnnouncedLink, ForeignNode, Record

__all__ = ["DeviceReading", "LocalLink", "Originator"]


@dataclass(frozen=True, slots=True)
class LocalLink:
    """One link of this node, as its node file configures it."""

    link_id: str
    neighbour: NodeId
    kind: LinkKindName
    configured_cost: float
    nominal_rate_bps: float = 0.0  # QKD: the configured secret key rate
    foreign: bool = False  # the neighbour is a foreign KMS (no hellos, no link state)


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One poll of a QKD device, as the relay's poller made it."""

    reachable: bool
    rate_bps: float | None = None  # None: not measured yet
    stored_keys: int = 0
    max_keys: int = 0


@dataclass
class _LinkState:
    link: LocalLink
    healthy_since_ms: int | None = None  # None: not healthy now
    announced_up: bool | None = None  # None: never announced
    ever_down: bool = False
    smoothed_rate: float | None = None
    rate_at_ms: int = 0
    reading: DeviceReading | None = None
    announced_cost: float | None = None
    cost_changed_ms: int = 0
    forced_down: bool = False
    cost_override: float | None = None
    reason: str = "neighbour silent"


@dataclass
class Originator:
    """Builds this node's records; call :meth:`observe`, then :meth:`due` / :meth:`build`."""

    me: NodeId
    federation: str
    saes: tuple[SaeId, ...]
    links: tuple[LocalLink, ...]
    settings: LinkStateSettings
    foreign: tuple[ForeignNode, ...] = ()
    _state: dict[str, _LinkState] = field(init=False)
    _sequence: int = field(init=False, default=0)
    _signed_ms: int = field(init=False, default=0)
    _announced: tuple[object, ...] | None = field(init=False, default=None)
    _urgent: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self._state = {link.link_id: _LinkState(link) for link in self.links}

    # -- inputs ------------------------------------------------------------------

    def observe(self, neighbours_up: Mapping[NodeId, bool],
                devices: Mapping[str, DeviceReading], now_ms: int) -> None:
        """Take in one report of the relay: who answers hellos, what each device said."""
        for s in self._state.values():
            link = s.link
            reading = devices.get(link.link_id)
            if reading is not None:
                s.reading = reading
                self._sample(s, reading, now_ms)
            if link.foreign:
                healthy, why = True, ""
            elif not neighbours_up.get(link.neighbour, False):
                healthy, why = False, "neighbour silent"
            elif link.kind == "qkd" and reading is not None and not reading.reachable:
                healthy, why = False, "device unreachable"
            else:
                healthy, why = True, ""
            if healthy and s.healthy_since_ms is None:
                s.healthy_since_ms = now_ms
            elif not healthy:
                s.healthy_since_ms = None
                s.reason = why

    def _sample(self, s: _LinkState, reading: DeviceReading, now_ms: int) -> None:
        if (s.link.kind != "qkd" or reading.rate_bps is None or not reading.reachable
                or (reading.max_keys and reading.stored_keys >= 0.95 * reading.max_keys)):
            return
        rate = max(0.0, reading.rate_bps)
        if s.smoothed_rate is None:
            s.smoothed_rate = rate
        else:
            dt_s = max(0.0, (now_ms - s.rate_at_ms) / 1000)
            alpha = 1.0 - math.exp(-dt_s / self.settings.rate_tau_s)
            s.smoothed_rate += alpha * (rate - s.smoothed_rate)
        s.rate_at_ms = now_ms

    def override(self, link_id: str, up: bool, cost: float | None) -> bool:
        """An operator's ``kmstn link``: hold a link of this node down, or re-cost it.

        Returns False when ``link_id`` is not a link of this node.
        """
        s = self._state.get(link_id)
        if s is None:
            return False
        if up and s.forced_down:
            # The operator's own hold ends: no hold-down, that was no fault.
            s.ever_down = False
        s.forced_down = not up
        if cost is not None:
            s.cost_override = float(cost)
        self._urgent = True
        return True

    def saw_own(self, sequence: int) -> None:
        """A record of this node with ``sequence`` is out there (a previous run's)."""
        if sequence >= self._sequence:
            self._sequence = sequence
            self._urgent = True

    # -- outputs -----------------------------------------------------------------

    def _announce(self, s: _LinkState, now_ms: int) -> tuple[bool, float, str]:
        """Up, cost and reason this link would be announced with now (updates hysteresis)."""
        healthy = s.healthy_since_ms is not None and not s.forced_down
        if not healthy:
            up = False
        elif s.ever_down and not s.announced_up:
            up = now_ms - (s.healthy_since_ms or now_ms) >= self.settings.up_hold_s * 1000
        else:
            up = True
        cost = self._target_cost(s)
        if s.announced_cost is None:
            s.announced_cost, s.cost_changed_ms = cost, now_ms
        else:
            ratio = max(cost, s.announced_cost) / min(cost, s.announced_cost)
            settled = now_ms - s.cost_changed_ms >= self.settings.min_cost_interval_s * 1000
            if s.cost_override is not None and cost != s.announced_cost:
                settled, ratio = True, math.inf  # an operator's cost takes effect at once
            if ratio >= self.settings.cost_hysteresis and settled:
                s.announced_cost, s.cost_changed_ms = cost, now_ms
        reason = "" if up else ("operator" if s.forced_down else
                                s.reason if s.healthy_since_ms is None else "holding down")
        return up, s.announced_cost, reason

    def _target_cost(self, s: _LinkState) -> float:
        base = s.cost_override if s.cost_override is not None else s.link.configured_cost
        if s.link.kind != "qkd" or s.smoothed_rate is None or s.link.nominal_rate_bps <= 0:
            return base
        if s.smoothed_rate <= 0:
            return base * self.settings.max_cost_factor
        factor = s.link.nominal_rate_bps / s.smoothed_rate
        return base * min(self.settings.max_cost_factor, max(1.0, factor))

    def _links_now(self, now_ms: int) -> tuple[AnnouncedLink, ...]:
        out = []
        for s in self._state.values():
            up, cost, reason = self._announce(s, now_ms)
            r = s.reading
            out.append(AnnouncedLink(
                s.link.link_id, s.link.neighbour, s.link.kind, up, cost,
                s.cost_override if s.cost_override is not None else s.link.configured_cost,
                s.link.nominal_rate_bps,
                s.smoothed_rate if s.smoothed_rate is not None else 0.0,
                r.stored_keys if r is not None else 0, r.max_keys if r is not None else 0,
                reason))
        return tuple(out)

    def due(self, now_ms: int) -> bool:
        """Whether a new record should be signed now (a change that matters, or refresh)."""
        if self._urgent:
            return True
        if now_ms - self._signed_ms >= self.settings.refresh_s * 1000:
            return True
        return self._summary(self._links_now(now_ms)) != self._announced

    @staticmethod
    def _summary(links: tuple[AnnouncedLink, ...]) -> tuple[object, ...]:
        # What routing acts on; measurements alone (rate, stock) ride along in
        # the next record but never cause one.
        return tuple((link.link_id, link.up, link.cost) for link in links)

    def build(self, now_ms: int) -> Record:
        """The next record of this node (a new, higher sequence number)."""
        links = self._links_now(now_ms)
        for s, link in zip(self._state.values(), links, strict=True):
            if s.announced_up and not link.up:
                s.ever_down = True
            s.announced_up = link.up
        self._sequence = max(self._sequence + 1, now_ms)
        self._signed_ms = now_ms
        self._announced = self._summary(links)
        self._urgent = False
        return Record(self.me, self._sequence, now_ms, self.settings.lifetime_s, self.federation,
                      self.saes, links, self.foreign)
