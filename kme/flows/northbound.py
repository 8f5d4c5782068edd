"""The master side of ETSI GS QKD 014: Get status and Get key for SAEs served here.

Keys come from this node's QKD device: the device of the QKD link that
reaches a slave's node directly if there is one, else the device on the
first hop of a route, else any device of this node. A node without QKD
links draws keys from the operating system's CSPRNG. Where each
destination's copy goes, and what happens when one fails, is
:mod:`kme.flows.delivery`'s.

**Confirmed mode** (default): the master gets the keys only once every
destination acknowledged storing them, so any key ID a master holds is
retrievable by its slaves; if any destination fails, the master gets 503
and every copy already placed is voided. **Concurrent mode** (the paper's):
the deliveries are recorded durably, the master gets the keys at once, and
delivery runs in the background.

:func:`source_of` and :func:`limits_for` are pure (configuration and
routes only), so the 014 gateway computes a request's limits itself and
parses it before the one call to the relay.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kme.config import (
    CSPRNG_MAX_KEY_COUNT,
    CSPRNG_MAX_PER_REQUEST,
    MAX_SAE_ID_COUNT,
    NodeConfig,
    QkdLink,
)
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import KeyLimits, Status
from kme.flows.context import Context
from kme.flows.delivery import Delivery, Placement
from kme.flows.ports import Device, Routes
from kme.types import Deadline, Key, NodeId, SecretBytes

if TYPE_CHECKING:
    from kme.flows.stocks import Stocks
    from kme.flows.supply import Quotas, Supply

__all__ = ["MAX_SAE_ID_COUNT", "Northbound", "Source", "dec_keys", "draw", "limits_for",
           "own_sae", "source_of"]



@dataclass(frozen=True, slots=True)
class Source:
    """Where a request's keys come from."""

    link: QkdLink | None  # None: the CSPRNG
    # The neighbour at the link's other end when it is a destination itself.
    direct: NodeId | None


def source_of(config: NodeConfig, routes: Routes, dests: Sequence[NodeId]) -> Source:
    node = config.node_id
    qkd: dict[NodeId, QkdLink] = {}
    for link in config.topology.qkd_links:
        if node in (link.a, link.b) and link.id in config.qkd_devices:
            qkd[link.other(node)] = link
    for dest in dests:
        if dest in qkd:
            return Source(qkd[dest], dest)
    for dest in dests:
        if dest == node:
            continue
        try:
            hop = routes.route_to_node(dest).next_hop
        except KmstnError as exc:
            # No path now: Get status still answers; Get key checks every route itself.
            if exc.code is not ErrorCode.NO_ROUTE:
                raise
            continue
        if hop in qkd:
            return Source(qkd[hop], None)
    for link in qkd.values():
        return Source(link, None)
    return Source(None, None)


def limits_for(config: NodeConfig, routes: Routes, slave: str) -> tuple[KeyLimits, int]:
    """ETSI 014 limits for keys meant for ``slave``, and max_key_count."""
    source = source_of(config, routes, [routes.node_of_sae(slave)])
    if source.link is None:
        size = config.topology.key_size
        return (KeyLimits(size, min(64, size), max(1024, size), CSPRNG_MAX_PER_REQUEST,
                          MAX_SAE_ID_COUNT), CSPRNG_MAX_KEY_COUNT)
    link = source.link
    return (KeyLimits(link.key_size, link.min_key_size, link.max_key_size,
                      link.max_key_per_request, MAX_SAE_ID_COUNT), link.max_key_count)


def own_sae(config: NodeConfig, sae: str, routes: Routes | None = None) -> None:
    """Refuse (401) an SAE that this node does not serve.

    A per-node file names only this node's SAEs; ``routes`` knows where the
    others are (learned from link state), for a clearer refusal.
    """
    node = config.topology.saes.get(sae)  # type: ignore[call-overload]
    if node is None and routes is not None and _known_sae(config, routes, sae):
        node = routes.node_of_sae(sae)
    if node is None:
        raise KmstnError(ErrorCode.UNAUTHENTICATED, f"SAE {sae!r} is not in the topology")
    if node != config.node_id:
        raise KmstnError(ErrorCode.PERMISSION_DENIED,
                         f"SAE {sae!r} is served by {node}, not by {config.node_id}")


def draw(device: Device | None, number: int, size: int, for_neighbour: bool = False
         ) -> list[Key]:
    """Keys from the device, or from the CSPRNG when there is none."""
    if device is not None:
        return device.enc_keys(number, size, reserved_ok=for_neighbour)
    nbytes = (size + 7) // 8
    keys = []
    for _ in range(number):
        raw = bytearray(secrets.token_bytes(nbytes))
        if size % 8:
            raw[-1] &= (0xFF << (8 - size % 8)) & 0xFF  # pad bits are zero
        keys.append(Key(uuid.uuid4(), SecretBytes(raw), size))
    return keys


class Northbound:
    # A device's stored_key_count is read at most this often for Get status.
    STATUS_MAX_AGE_S = 1.0

    # Time kept back from a request's deadline for the delivery after a wait.
    WAIT_MARGIN_S = 1.0

    def __init__(self, ctx: Context, delivery: Delivery, supply: Supply | None = None,
                 stocks: Stocks | None = None, quotas: Quotas | None = None) -> None:
        self._ctx = ctx
        self._delivery = delivery
        # Issue 11 (all None when the node file has no [supply]: today's behaviour).
        self._supply = supply
        self._stocks = stocks
        self._quotas = quotas
        # Devices' stored_key_count as last read, and draws so far, per link.
        self._stored: dict[str, tuple[float, int]] = {}
        self._draws: dict[str, int] = defaultdict(int)
        self._stored_lock = threading.Lock()

    def status(self, master: str, slave: str) -> Status:
        """ETSI 014 clause 5.1 Status for this master and ``slave``.

        Complete and cheap whatever the network does: SAEs (firewalls among
        them) poll it as a liveness probe, and clause 4.1 has no "unknown"
        value, so a path that is down or a device that does not answer shows
        as ``stored_key_count`` 0, not as an error. ``stored_key_count`` never
        exceeds ``max_key_count`` (clause 4.1: the most it can reach).
        """
        config = self._ctx.config
        own_sae(config, master, self._ctx.routes)
        dest = self._ctx.node_of(slave)
        if slave == master:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             "slave_SAE_ID must differ from the master_SAE_ID")
        limits, max_count = limits_for(config, self._ctx.routes, slave)
        source = source_of(config, self._ctx.routes, [dest])
        stored = 0
        if self._reachable(dest):
            stored = max_count if source.link is None else self._stored_on(source.link.id)
            if self._stocks is not None:
                # Keys already relayed for exactly this pair count too (issue 11).
                plan = self._stocks.plan_for(master, [slave], limits.key_size)
                if plan is not None:
                    stored += self._stocks.level(plan.stock)
        stored = min(stored, max_count)
        return Status.of(source_kme_id=self._ctx.node, target_kme_id=dest,
                         master_sae_id=master, slave_sae_id=slave, limits=limits,
                         stored_key_count=stored, max_key_count=max_count)

    def _stored_on(self, link_id: str) -> int:
        """The device's stored_key_count, read at most once a second (0 if it does not answer).

        A poller must not cost one device round trip per probe; a draw through
        this node forgets the copy, so the count after its own enc_keys is exact.
        """
        if self._supply is not None:
            reading = self._supply.reading(link_id)
            if reading is not None:  # the supply poller reads the device anyway
                return reading.stored_keys
        now = time.monotonic()
        with self._stored_lock:
            seen, draws = self._stored.get(link_id), self._draws[link_id]
        if seen is not None and now - seen[0] < self.STATUS_MAX_AGE_S:
            return seen[1]
        try:
            stored = int(self._ctx.devices.for_link(link_id).status().stored_key_count)
        except KmstnError as exc:
            self._ctx.log.warning("status: the device did not answer", extra={
                "link": link_id, "error_code": exc.code.name})
            stored = 0
        with self._stored_lock:
            if self._draws[link_id] == draws:  # else a draw made this count stale already
                self._stored[link_id] = (now, stored)
        return stored

    def _forget_stored(self, link_id: str) -> None:
        with self._stored_lock:  # the count changes now
            self._draws[link_id] += 1
            self._stored.pop(link_id, None)

    def _reachable(self, dest: NodeId) -> bool:
        """Whether keys for ``dest`` can travel now (this node, a QKD neighbour, or a route)."""
        if dest == self._ctx.node or dest in self._ctx.qkd_links:
            return True
        try:
            self._ctx.routes.route_to_node(dest)
        except KmstnError as exc:
            if exc.code is not ErrorCode.NO_ROUTE:
                raise
            return False
        return True

    def enc_keys(self, master: str, slaves: Sequence[str], number: int, size: int,
                 deadline: Deadline, caller_alive: Callable[[], bool] = lambda: True,
                 wait_ms: int = 0) -> list[Key]:
        """Get key (ETSI 014 clause 5.2) for a master served here, toward every slave.

        With [supply] (issue 11): the master's quotas are charged first (over
        quota: OVER_QUOTA at once); a stock for exactly this pair serves it
        with no relay; otherwise, when the device has too little key, the
        request waits its turn up to ``wait_ms`` (at most the node's budget)
        before INSUFFICIENT_KEY with Retry-After.
        """
        own_sae(self._ctx.config, master, self._ctx.routes)
        if self._quotas is None:
            return self._enc_keys(master, slaves, number, size, deadline, caller_alive, wait_ms)
        refund = self._quotas.charge(master, slaves, number * size)
        try:
            return self._enc_keys(master, slaves, number, size, deadline, caller_alive, wait_ms)
        except KmstnError:
            refund()  # nothing was delivered: the bits are the master's again
            raise

    def _wait_until(self, wait_ms: int, deadline: Deadline) -> float:
        """The monotonic time a waiting request gives up: its budget, within its deadline."""
        budget = self._ctx.config.supply.wait_ms
        if wait_ms:
            budget = min(budget, wait_ms)
        limit = min(budget / 1000, deadline.remaining() - self.WAIT_MARGIN_S)
        return time.monotonic() + max(0.0, limit)

    def _draw(self, source: Source, device: Device | None, master: str, number: int,
              size: int, deadline: Deadline, wait_ms: int) -> list[Key]:
        """Draw from the device; with a wait budget, wait for key in fair order."""
        supply = self._supply
        link = source.link
        if link is None or supply is None or not self._ctx.config.supply.wait_ms:
            if link is not None:
                self._forget_stored(link.id)
            return draw(device, number, size, for_neighbour=source.direct is not None)
        until = self._wait_until(wait_ms, deadline)
        per_key = max(1, -(-size // link.key_size))
        turn = None
        if supply.must_queue(link.id):  # others wait already: no jumping the queue
            turn = supply.wait_turn(link.id, master, number * per_key, number * size, until)
        try:
            while True:
                self._forget_stored(link.id)
                try:
                    keys = draw(device, number, size, for_neighbour=source.direct is not None)
                except KmstnError as exc:
                    if exc.code is not ErrorCode.INSUFFICIENT_KEY:
                        raise
                    supply.drew(link.id)  # the last reading was too high
                    if turn is not None:
                        supply.done(link.id, turn)
                    turn = supply.wait_turn(link.id, master, number * per_key, number * size,
                                            until, front=turn is not None)
                    continue
                supply.drew(link.id, number * per_key)
                return keys
        finally:
            if turn is not None:
                supply.done(link.id, turn)

    def _enc_keys(self, master: str, slaves: Sequence[str], number: int, size: int,
                  deadline: Deadline, caller_alive: Callable[[], bool], wait_ms: int
                  ) -> list[Key]:
        ctx = self._ctx
        if self._stocks is not None:
            plan = self._stocks.plan_for(master, slaves, size)
            if plan is not None:
                stocked = self._stocks.take(plan, number)
                if stocked is not None:
                    # Held at the slave's node already (settled only after its
                    # ack), so confirmed mode needs no relay here.
                    if not caller_alive():
                        self._delivery.void_everywhere(
                            Placement.of(stocked, master, {NodeId(plan.stock.destination):
                                                           plan.stock.slaves}, None, None),
                            {}, deadline)
                        raise KmstnError(ErrorCode.TIMEOUT, "the master SAE's request went away")
                    return stocked
        by_dest: dict[NodeId, list[str]] = defaultdict(list)
        for t in slaves:
            by_dest[ctx.node_of(t)].append(t)
        source = source_of(ctx.config, ctx.routes, list(by_dest))
        device = ctx.devices.for_link(source.link.id) if source.link is not None else None
        # Validate every route before taking key material, so a request that
        # cannot be served consumes nothing.
        for d in by_dest:
            if d not in (ctx.node, source.direct):
                ctx.routes.route_to_node(d)
        deadline.require("taking keys")
        keys = self._draw(source, device, master, number, size, deadline, wait_ms)
        placement = Placement.of(keys, master, {d: tuple(s) for d, s in by_dest.items()},
                                 source.link.id if source.link else None, source.direct)
        if ctx.node in by_dest:
            self._delivery.store_here(keys, master, placement.by_dest[ctx.node])
        if ctx.config.gateway.delivery == "concurrent":
            self._delivery.concurrent(placement)
            return keys
        self._delivery.confirmed(placement, deadline)
        if not caller_alive():
            # The master went away while its keys were placed: nobody will
            # ever hold these IDs, so take every copy back (rule 6.3).
            failure = KmstnError(ErrorCode.TIMEOUT, "the master SAE's request went away")
            self._delivery.void_everywhere(placement, {}, deadline)
            raise failure
        return keys


def dec_keys(config: NodeConfig, take: Callable[[str, str, list[uuid.UUID], int], list[Key]],
             slave: str, master: str, key_ids: Sequence[uuid.UUID],
             routes: Routes | None = None) -> list[Key]:
    """Get key with key IDs (ETSI 014 clause 5.3): once, only for a named slave.

    ``take`` is the keyvault's take-once (KeyVaultClient.take); the 014 gateway
    calls this with it directly, no relay in between. ``routes`` knows the
    SAEs of other nodes (learned from link state); without it, the node
    file's.
    """
    own_sae(config, slave, routes)
    if not _known_sae(config, routes, master):
        raise KmstnError(ErrorCode.KEY_NOT_FOUND, "unknown master")
    gateway = config.gateway
    # Concurrent mode: a key may still be on its way; wait for it a little.
    wait = gateway.inflight_wait_ms if gateway.delivery == "concurrent" else 0
    return take(slave, master, list(key_ids), wait)


def _known_sae(config: NodeConfig, routes: Routes | None, sae: str) -> bool:
    if routes is None:
        return sae in config.topology.saes
    try:
        routes.node_of_sae(sae)
    except KmstnError as exc:
        if exc.code is not ErrorCode.UNKNOWN_SAE:
            raise
        return False
    return True
