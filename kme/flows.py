"""Key negotiation, in one place: enc_keys, dec_keys, status (ETSI 014) and
ext_keys, void, ack (ETSI 020), over the node's services.

The gateway's views parse and authenticate, then call one method here; this
module decides where keys come from, where they go and when the caller gets
an answer, and talks to the services only through the small ports below
(routing, keyvault, relay, QKD devices), so unit tests can use fakes.

Delivery (paper IV-A, ETSI 020 clause 6):

- **Key source.** Keys come from this node's QKD device: the device of the
  QKD link that reaches a slave's node directly if there is one, else the
  device on the first hop of a route, else any device of this node. A node
  without QKD links draws keys from the operating system's CSPRNG.
- **Same node.** A slave served by this node: the keys go straight into the
  keyvault for the named slaves.
- **QKD neighbour.** A slave on the node at the other end of the device's
  QKD link: no key relay at all. The key bytes cross only the QKD link; this
  node sends the neighbour a sealed *device-keys* notice holding just the
  key IDs and the named SAEs, and the neighbour reads the bytes from its own
  side of the device and keeps them in its keyvault for exactly those SAEs.
  (A vendor device knows only the two KMSTNs, not which SAE may take which
  key; the notice is what lets the neighbour refuse an SAE not named.)
- **Anywhere else.** An ETSI 020 ext_keys toward the slave's node, hop by
  hop, each hop sealed by the relay (QKD XOR ML-KEM over a QKD link, ML-KEM
  over a PQC link, plain 020 toward a foreign KMS over a site link).
- **Confirmed mode** (default): the master gets the keys only once every
  destination acknowledged storing them, so any key ID a master holds is
  retrievable by its slaves. If any destination fails, the master gets 503
  and every copy already placed is voided.
- **Concurrent mode** (the paper's): the master gets the keys at once and
  delivery runs in the background; a slave's dec_keys for a key still in
  flight waits up to ``inflight_wait_ms``.

Between kmstn nodes every ext_keys is synchronous (the answer carries the
acks, so no callback is needed); toward a foreign KMS the relay uses the
mode the peer supports. Messages carry a hop count; a message that has made
``MAX_HOPS`` hops is refused, so a routing loop (nodes with different link
state) cannot circulate keys forever.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kme import etsi020
from kme.config import NodeConfig, QkdLink
from kme.errors import ErrorCode, KmstnError
from kme.etsi020 import AckContainer, ExtKey, ExtKeyContainer, VoidContainer
from kme.types import Key, NodeId, SecretBytes, parse_key_id, sae_id

__all__ = [
    "MAX_HOPS",
    "DeviceKeysNotice",
    "DevicePort",
    "DevicesPort",
    "Flows",
    "ForwardResult",
    "OpenedMessage",
    "RelayPort",
    "Retrier",
    "RoutingPort",
    "VaultPort",
]

MAX_HOPS = 32
MessageType = Literal["ext_keys", "void", "ack", "device_keys"]


# -- ports ---------------------------------------------------------------------


class RouteLike(Protocol):
    @property
    def destination(self) -> NodeId: ...
    @property
    def next_hop(self) -> NodeId | None: ...
    @property
    def next_kind(self) -> str | None: ...


class RoutingPort(Protocol):
    def route_to_node(self, node: str) -> RouteLike: ...


@dataclass(frozen=True, slots=True)
class StoreRequest:
    key: Key
    master_sae_id: str
    allowed_sae_ids: tuple[str, ...]
    origin_node_id: str


class VaultPort(Protocol):
    def store(self, items: Sequence[StoreRequest]) -> int: ...
    def take(self, sae_id: str, master_sae_id: str, key_ids: Sequence[uuid.UUID],
             wait_ms: int = 0) -> list[Key]: ...
    def void(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
             target_sae_ids: Sequence[str], all_confirmation: bool = False
             ) -> list[AckContainer]: ...


@dataclass(frozen=True, slots=True)
class ForwardResult:
    http_status: int
    body: bytes
    acks: tuple[AckContainer, ...] = ()


@dataclass(frozen=True, slots=True)
class OpenedMessage:
    body: bytes
    hop: int


class RelayPort(Protocol):
    def forward(self, next_hop: str, message_type: MessageType, body: bytes, hop: int,
                timeout: float) -> ForwardResult: ...
    def open(self, peer: str, message_type: MessageType, envelope: bytes) -> OpenedMessage: ...
    def deliver_ack(self, peer: str, acks: Sequence[AckContainer]) -> list[uuid.UUID]: ...
    def send_ack(self, peer: str, callback_url: str, acks: Sequence[AckContainer]) -> int: ...


class DevicePort(Protocol):
    @property
    def link(self) -> QkdLink: ...
    def enc_keys(self, number: int = 1, size: int | None = None) -> list[Key]: ...
    def dec_keys(self, key_ids: Sequence[uuid.UUID]) -> list[Key]: ...
    def status(self) -> Any: ...


class DevicesPort(Protocol):
    def toward(self, peer: NodeId) -> DevicePort | None: ...
    def for_link(self, link_id: str) -> DevicePort: ...


# -- the flows -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What the northbound 014 API serves for one master/slave pair."""

    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int
    max_key_count: int
    max_sae_id_count: int
    source_link: str | None  # None: keys from the CSPRNG


@dataclass(slots=True)
class _Plan:
    """Where each destination's keys go: validated before anything is kept."""

    local: tuple[str, ...]
    remote: dict[NodeId, tuple[NodeId, tuple[str, ...]]]  # dest -> (next hop, targets)


class Retrier:
    """Runs failed background jobs again later, with growing delays.

    Used after a failed delivery: the ETSI 020 void of every copy (rule 6.3),
    which must still reach a node once the path to it is back, and in
    concurrent mode the delivery itself. A job returns normally when done
    and raises KmstnError when it failed; a failure that may pass (node or
    path unreachable, timeout) is tried again after the next delay, any
    other failure, or the last delay, gives up: ``on_give_up`` gets the
    last error, or it is logged. One thread keeps the schedule; the attempts
    run on ``run`` (the flows' pool), so a slow attempt delays no other.
    """

    def __init__(self, log: logging.Logger, delays: Sequence[float] = (0.5, 1, 2, 4, 8, 16),
                 limit: int = 10_000,
                 run: Callable[[Callable[[], None]], object] | None = None) -> None:
        self._log = log
        self._delays = tuple(delays)
        self._limit = limit
        self._run_attempt = run or (lambda fn: fn())
        self._heap: list[tuple[float, int, int, _RetryJob]] = []
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None], about: dict[str, Any],
               on_give_up: Callable[[KmstnError], None] | None = None) -> None:
        """Run ``job`` after the first delay, and again while it fails."""
        self._schedule(_RetryJob(job, about, on_give_up), 0)

    def _schedule(self, job: _RetryJob, attempt: int) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._heap) >= self._limit:
                self._log.error("retry queue full; job dropped", extra=job.about)
                return
            due = time.monotonic() + self._delays[attempt]
            heapq.heappush(self._heap, (due, self._seq, attempt, job))
            self._seq += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._keep_schedule,
                                                name="flows-retry", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _keep_schedule(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, attempt, job = heapq.heappop(self._heap)
            try:
                self._run_attempt(functools.partial(self._attempt, job, attempt))
            except RuntimeError:  # the pool shut down: the flows are closing
                return

    def _attempt(self, job: _RetryJob, attempt: int) -> None:
        try:
            job.fn()
        except KmstnError as exc:
            if exc.code in _TRANSIENT and attempt + 1 < len(self._delays):
                self._schedule(job, attempt + 1)
            elif job.on_give_up is not None:
                job.on_give_up(exc)
            else:
                self._log.error("gave up after retries", extra={
                    **job.about, "attempts": attempt + 2, "error_code": exc.code.name,
                    "error": exc.public})
        except Exception:
            self._log.exception("retried job crashed", extra=job.about)

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


@dataclass(frozen=True)
class _RetryJob:
    fn: Callable[[], None]
    about: dict[str, Any]
    on_give_up: Callable[[KmstnError], None] | None


class Flows:
    MAX_SAE_ID_COUNT = 8

    def __init__(self, config: NodeConfig, routing: RoutingPort, vault: VaultPort,
                 relay: RelayPort, devices: DevicesPort, log: logging.Logger | None = None,
                 workers: int = 16) -> None:
        self.config = config
        self.node = config.node_id
        self.topology = config.topology
        self.routing = routing
        self.vault = vault
        self.relay = relay
        self.devices = devices
        self.log = log or logging.getLogger("kmstn.flows")
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="flows")
        self._retrier = Retrier(self.log, run=self._pool.submit)
        self._relay_timeout = config.gateway.relay_timeout_ms / 1000
        self._qkd_links = {link.other(self.node): link for link in self.topology.qkd_links
                           if self.node in (link.a, link.b)}
        # Devices' stored_key_count as last read, and draws so far, per link (_stored_on).
        self._stored: dict[str, tuple[float, int]] = {}
        self._draws: dict[str, int] = defaultdict(int)
        self._stored_lock = threading.Lock()

    def in_background(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the flows' pool (asynchronous ETSI 020 requests)."""

        def guarded() -> None:
            try:
                fn()
            except Exception:
                self.log.exception("background task crashed")

        self._pool.submit(guarded)

    def close(self) -> None:
        self._retrier.close()
        self._pool.shutdown(wait=True, cancel_futures=False)

    # -- identities ------------------------------------------------------------

    def own_sae(self, sae: str) -> None:
        """Refuse (401) an SAE that this node does not serve."""
        node = self.topology.saes.get(sae)  # type: ignore[call-overload]
        if node is None:
            raise KmstnError(ErrorCode.UNAUTHENTICATED,
                             f"SAE {sae!r} is not in the topology")
        if node != self.node:
            raise KmstnError(ErrorCode.PERMISSION_DENIED,
                             f"SAE {sae!r} is served by {node}, not by {self.node}")

    def _node_of(self, sae: str) -> NodeId:
        return self.topology.node_of_sae(sae)

    # -- key source --------------------------------------------------------------

    def _source(self, dests: Sequence[NodeId]) -> tuple[DevicePort | None, NodeId | None]:
        """The device to take keys from and the neighbour it serves directly, if any."""
        for dest in dests:
            if dest in self._qkd_links:
                device = self.devices.toward(dest)
                if device is not None:
                    return device, dest
        for dest in dests:
            if dest == self.node:
                continue
            try:
                hop = self.routing.route_to_node(dest).next_hop
            except KmstnError as exc:
                # No path now: status still answers; enc_keys checks every route itself.
                if exc.code is not ErrorCode.NO_ROUTE:
                    raise
                continue
            if hop in self._qkd_links:
                device = self.devices.toward(hop)
                if device is not None:
                    return device, None
        for peer in self._qkd_links:
            device = self.devices.toward(peer)
            if device is not None:
                return device, None
        return None, None

    def limits(self, slave: str) -> Limits:
        """ETSI 014 limits for keys meant for ``slave`` (from the source device's link)."""
        dest = self._node_of(slave)
        device, _ = self._source([dest])
        if device is None:
            size = self.topology.key_size
            return Limits(size, min(64, size), max(1024, size), 128, 100_000,
                          self.MAX_SAE_ID_COUNT, None)
        link = device.link
        return Limits(link.key_size, link.min_key_size, link.max_key_size,
                      link.max_key_per_request, link.max_key_count, self.MAX_SAE_ID_COUNT,
                      link.id)

    def _draw(self, device: DevicePort | None, number: int, size: int) -> list[Key]:
        if device is not None:
            with self._stored_lock:  # the count changes now
                self._draws[device.link.id] += 1
                self._stored.pop(device.link.id, None)
            return device.enc_keys(number, size)
        nbytes = (size + 7) // 8
        keys = []
        for _ in range(number):
            raw = bytearray(secrets.token_bytes(nbytes))
            if size % 8:
                raw[-1] &= (0xFF << (8 - size % 8)) & 0xFF  # pad bits are zero
            keys.append(Key(uuid.uuid4(), SecretBytes(raw), size))
        return keys

    # -- ETSI 014: status --------------------------------------------------------

    def status(self, master: str, slave: str) -> dict[str, Any]:
        """ETSI 014 clause 4.1 Status for this master and ``slave``.

        Complete and cheap whatever the network does: SAEs (firewalls among
        them) poll it as a liveness probe, and clause 4.1 has no "unknown"
        value, so a path that is down or a device that does not answer shows
        as ``stored_key_count`` 0, not as an error. ``stored_key_count`` never
        exceeds ``max_key_count`` (clause 4.1: the most it can reach).
        """
        self.own_sae(master)
        dest = self._node_of(slave)
        if slave == master:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "slave_SAE_ID must differ from the "
                             "master_SAE_ID")
        limits = self.limits(slave)
        stored = 0
        if self._reachable(dest):
            stored = (limits.max_key_count if limits.source_link is None
                      else self._stored_on(limits.source_link))
        stored = min(stored, limits.max_key_count)
        return {
            "source_KME_ID": self.node,
            "target_KME_ID": dest,
            "master_SAE_ID": master,
            "slave_SAE_ID": slave,
            "key_size": limits.key_size,
            "stored_key_count": stored,
            "max_key_count": limits.max_key_count,
            "max_key_per_request": limits.max_key_per_request,
            "max_key_size": limits.max_key_size,
            "min_key_size": limits.min_key_size,
            "max_SAE_ID_count": limits.max_sae_id_count,
        }

    STATUS_MAX_AGE_S = 1.0

    def _stored_on(self, link_id: str) -> int:
        """The device's stored_key_count, read at most once a second (0 if it does not answer).

        A poller must not cost one device round trip per probe; a draw through
        this node forgets the copy (``_draw``), so the count it shows after
        its own enc_keys is exact. Other processes' draws show within a second.
        """
        now = time.monotonic()
        with self._stored_lock:
            seen, draws = self._stored.get(link_id), self._draws[link_id]
        if seen is not None and now - seen[0] < self.STATUS_MAX_AGE_S:
            return seen[1]
        try:
            stored = int(self.devices.for_link(link_id).status().stored_key_count)
        except KmstnError as exc:
            self.log.warning("status: device %s did not answer (%s)", link_id, exc.code.name)
            stored = 0
        with self._stored_lock:
            if self._draws[link_id] == draws:  # else a draw made this count stale already
                self._stored[link_id] = (now, stored)
        return stored

    def _reachable(self, dest: NodeId) -> bool:
        """Whether keys for ``dest`` can travel now (this node, a QKD neighbour, or a route)."""
        if dest == self.node or dest in self._qkd_links:
            return True
        try:
            self.routing.route_to_node(dest)
        except KmstnError as exc:
            if exc.code is not ErrorCode.NO_ROUTE:
                raise
            return False
        return True

    # -- ETSI 014: enc_keys ------------------------------------------------------

    def enc_keys(self, master: str, slave: str, number: int, size: int,
                 additional_slaves: Sequence[str] = ()) -> list[Key]:
        """Get key (ETSI 014 clause 5.2) for a master served here, toward every slave."""
        self.own_sae(master)
        targets = (slave, *additional_slaves)
        by_dest: dict[NodeId, list[str]] = defaultdict(list)
        for t in targets:
            by_dest[self._node_of(t)].append(t)
        device, direct = self._source(list(by_dest))
        # Validate every route before taking key material, so a request that
        # cannot be served consumes nothing.
        routes = {d: self.routing.route_to_node(d) for d in by_dest
                  if d != self.node and d != direct}
        keys = self._draw(device, number, size)
        jobs: list[tuple[NodeId, Callable[[], None]]] = []
        for dest, saes in by_dest.items():
            group = tuple(saes)
            if dest == self.node:
                self._store(keys, master, group)
            elif dest == direct and device is not None:
                jobs.append((dest, functools.partial(self._device_keys, dest, device.link.id,
                                                     keys, master, group)))
            else:
                hop = _next_hop(routes[dest])
                jobs.append((dest, functools.partial(self._ext_keys_to, hop, keys, master,
                                                     group, 1)))
        if self.config.gateway.delivery == "concurrent":
            for dest, job in jobs:
                self._pool.submit(self._background, dest, job, keys, master, by_dest)
            return keys
        failures = self._run_all(jobs)
        if failures:
            placed = [d for d in by_dest if d not in failures]
            self._pool.submit(self._void_everywhere, keys, master, by_dest, placed, failures)
            first = next(iter(failures.values()))
            raise KmstnError(ErrorCode.UNAVAILABLE,
                             "keys could not be delivered to every slave's KMSTN",
                             cause="; ".join(f"{d}: {e.code.name} {e.public}"
                                             for d, e in failures.items())
                             + (f" ({first.cause})" if first.cause else ""))
        return keys

    def _run_all(self, jobs: list[tuple[NodeId, Callable[[], None]]]) -> dict[NodeId,
                                                                               KmstnError]:
        failures: dict[NodeId, KmstnError] = {}
        if len(jobs) == 1:  # the common case: no thread hop
            dest, job = jobs[0]
            try:
                job()
            except KmstnError as exc:
                failures[dest] = exc
            return failures
        futures: list[tuple[NodeId, Future[None]]] = [(d, self._pool.submit(j)) for d, j in jobs]
        for dest, fut in futures:
            try:
                fut.result(timeout=self._relay_timeout + 1)
            except KmstnError as exc:
                failures[dest] = exc
            except FutureTimeout:
                failures[dest] = KmstnError(ErrorCode.TIMEOUT, "delivery timed out")
        return failures

    def _background(self, dest: NodeId, job: Callable[[], None], keys: Sequence[Key],
                    master: str, by_dest: dict[NodeId, list[str]]) -> None:
        about = {"destination": dest, "key_ids": [str(k.key_id) for k in keys]}

        def give_up(exc: KmstnError) -> None:
            self.log.error("concurrent delivery failed", extra={
                **about, "error_code": exc.code.name, "error": exc.public, "cause": exc.cause})
            self._void_everywhere(keys, master, {dest: by_dest[dest]}, [], {dest: exc})

        try:
            job()
        except KmstnError as exc:
            if exc.code not in _TRANSIENT:
                give_up(exc)
                return
            # The master already holds the keys: keep trying to deliver them
            # (a resent ext_keys is idempotent at the destination).
            self.log.warning("concurrent delivery failed; will retry", extra={
                **about, "error_code": exc.code.name, "error": exc.public})
            self._retrier.submit(job, about, on_give_up=give_up)
        except Exception:
            self.log.exception("concurrent delivery crashed", extra={"destination": dest})

    def _store(self, keys: Sequence[Key], master: str, allowed: tuple[str, ...],
               origin: str | None = None) -> None:
        self.vault.store([StoreRequest(k, master, allowed, origin or self.node) for k in keys])

    # -- sending ---------------------------------------------------------------------

    def _check_acks(self, result: ForwardResult, key_ids: set[uuid.UUID]) -> None:
        """Raise unless the neighbour acknowledged every key as relayed."""
        if result.http_status in (400, 401):
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "the neighbour refused the keys",
                             cause=result.body[:512].decode("utf-8", "replace"),
                             reason="refused")
        acks = list(result.acks)
        if result.http_status == 200 and not acks:
            acks = etsi020.parse_acks(result.body)
        elif result.http_status not in (200, 202):
            raise KmstnError(ErrorCode.UNAVAILABLE, "the neighbour could not take the keys",
                             cause=f"HTTP {result.http_status}: "
                             + result.body[:512].decode("utf-8", "replace"))
        relayed = {k for a in acks if a.ack_status == "relayed" for k in a.key_ids}
        if not key_ids <= relayed:
            why = "; ".join(f"{a.ack_status}: {a.message or ''}" for a in acks
                            if a.ack_status != "relayed")
            raise KmstnError(ErrorCode.UNAVAILABLE, "a destination did not store the keys",
                             cause=why or "keys missing from the acks")

    def _ext_keys_to(self, next_hop: NodeId, keys: Sequence[Key], initiator: str,
                     targets: tuple[str, ...], hop_no: int,
                     extension_optional: dict[str, Any] | None = None) -> None:
        container = ExtKeyContainer(
            keys=tuple(ExtKey(k.key_id, k.material) for k in keys),
            initiator_sae_id=initiator, target_sae_ids=targets,
            extension_optional=extension_optional)
        result = self.relay.forward(next_hop, "ext_keys", etsi020.ext_keys_json(container),
                                    hop_no, self._relay_timeout)
        self._check_acks(result, {k.key_id for k in keys})

    def _device_keys(self, neighbour: NodeId, link_id: str, keys: Sequence[Key],
                     initiator: str, targets: tuple[str, ...]) -> None:
        notice = DeviceKeysNotice(tuple(k.key_id for k in keys), keys[0].size_bits, initiator,
                                  targets, link_id)
        result = self.relay.forward(neighbour, "device_keys", notice.to_json(), 1,
                                    self._relay_timeout)
        self._check_acks(result, set(notice.key_ids))

    def _void_everywhere(self, keys: Sequence[Key], master: str,
                         by_dest: dict[NodeId, list[str]], placed: Sequence[NodeId],
                         failures: dict[NodeId, KmstnError]) -> None:
        """ETSI 020 rule 6.3: after a failure, void every copy that may exist.

        A destination that cannot be reached now is tried again later (the
        copy may have arrived just before the path broke).
        """
        ids = tuple(k.key_id for k in keys)
        for dest, saes in by_dest.items():
            failed = failures.get(dest)
            if failed is not None and failed.reason == "refused":
                continue  # 400/401: the neighbour kept nothing (rule 6.2)
            void = functools.partial(self._void_at, dest, ids, master, tuple(saes))
            about = {"destination": dest, "key_ids": [str(k) for k in ids]}
            try:
                void()
            except KmstnError as exc:
                if exc.code in _TRANSIENT:
                    self.log.warning("void after failed delivery will be retried", extra={
                        **about, "error_code": exc.code.name, "error": exc.public})
                    self._retrier.submit(void, about)
                else:
                    self.log.error("void after failed delivery did not finish", extra={
                        **about, "error_code": exc.code.name, "error": exc.public})
        self.log.warning("keys voided after a failed delivery", extra={
            "key_ids": [str(k) for k in ids], "failed": sorted(failures), "placed": list(placed)})

    def _void_at(self, dest: NodeId, ids: tuple[uuid.UUID, ...], master: str,
                 saes: tuple[str, ...]) -> None:
        """Void ``ids`` for ``saes`` at ``dest``; raises unless the answer is final."""
        if dest == self.node:
            self.vault.void(ids, master, saes)
            return
        hop = _next_hop(self.routing.route_to_node(dest))
        result = self.relay.forward(hop, "void", etsi020.void_json(VoidContainer(ids, master,
                                                                                 saes)),
                                    1, self._relay_timeout)
        if result.http_status in (400, 401):
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "the void was refused",
                             cause=result.body[:512].decode("utf-8", "replace"))
        if result.http_status != 200 and not result.acks:
            # 503 or no answer: some node on the way could not pass it on.
            raise KmstnError(ErrorCode.UNAVAILABLE, f"void answered HTTP {result.http_status}")

    # -- ETSI 014: dec_keys ----------------------------------------------------------

    def dec_keys(self, slave: str, master: str, key_ids: Sequence[uuid.UUID]) -> list[Key]:
        """Get key with key IDs (ETSI 014 clause 5.3): once, only for a named slave."""
        self.own_sae(slave)
        if master not in self.topology.saes:
            raise KmstnError(ErrorCode.KEY_NOT_FOUND, "unknown master")
        wait = (self.config.gateway.inflight_wait_ms
                if self.config.gateway.delivery == "concurrent" else 0)
        return self.vault.take(slave, master, key_ids, wait)

    # -- ETSI 020: ext_keys, device_keys, void ------------------------------------------

    def plan_ext_keys(self, peer: NodeId, c: ExtKeyContainer, hop: int) -> _Plan:
        """Everything that can refuse an ext_keys with 400/503 before anything is kept."""
        if hop > MAX_HOPS:
            raise KmstnError(ErrorCode.NO_ROUTE, f"hop limit {MAX_HOPS} reached")
        if c.extension_mandatory:
            names = ", ".join(sorted(c.extension_mandatory))
            raise KmstnError(ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION,
                             f"extension_mandatory not supported: {names}")
        local: list[str] = []
        remote: dict[NodeId, tuple[NodeId, list[str]]] = {}
        for t in c.target_sae_ids:
            dest = self._node_of(t)
            if dest == self.node:
                local.append(t)
                continue
            if dest in remote:
                remote[dest][1].append(t)
                continue
            nxt = self.routing.route_to_node(dest).next_hop
            if nxt is None or nxt == peer:
                raise KmstnError(ErrorCode.INVALID_ROUTING,
                                 f"the route to {t!r} leads back to the sender")
            remote[dest] = (nxt, [t])
        return _Plan(tuple(local), {d: (h, tuple(ts)) for d, (h, ts) in remote.items()})

    def ext_keys(self, peer: NodeId, c: ExtKeyContainer, hop: int,
                 plan: _Plan | None = None) -> list[AckContainer]:
        """Store or forward an incoming ext_keys; the answer is its ack containers."""
        plan = plan or self.plan_ext_keys(peer, c, hop)
        keys = [Key(k.key_id, k.value, len(k.value) * 8) for k in c.keys]
        origin = self.topology.saes.get(c.initiator_sae_id, peer)  # type: ignore[call-overload]
        acks: list[AckContainer] = []

        def ack(targets: Sequence[str], status: str, message: str | None = None) -> None:
            acks.append(AckContainer(c.key_ids, status, c.initiator_sae_id, tuple(targets),
                                     message))

        if plan.local:
            try:
                self._store(keys, c.initiator_sae_id, plan.local, origin)
                ack(plan.local, "relayed")
            except KmstnError as exc:
                if exc.code is ErrorCode.KEY_CONFLICT and not plan.remote:
                    raise  # nothing new was kept: 400 (ETSI 020 rule 6.2)
                ack(plan.local, "failed", exc.public)
        jobs = [(dest, nxt, targets) for dest, (nxt, targets) in plan.remote.items()]

        failures = self._run_all([
            (dest, functools.partial(self._ext_keys_to, nxt, keys, c.initiator_sae_id, targets,
                                     hop + 1, c.extension_optional))
            for dest, nxt, targets in jobs])
        for dest, _, targets in jobs:
            failure = failures.get(dest)
            ack(targets, "relayed" if failure is None else "failed",
                None if failure is None else failure.public)
        self.log.info("ext_keys handled", extra={
            "peer": peer, "hop": hop, "key_ids": [str(k) for k in c.key_ids],
            "local": list(plan.local), "forwarded": [str(d) for d in plan.remote],
            "failed": [str(d) for d in failures]})
        return _merge(acks)

    def device_keys(self, peer: NodeId, notice: DeviceKeysNotice) -> list[AckContainer]:
        """A QKD neighbour took keys from our shared device for SAEs served here."""
        link = self._qkd_links.get(peer)
        if link is None or link.id != notice.link_id:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             f"{peer} shares no QKD link {notice.link_id!r} with {self.node}")
        for t in notice.target_sae_ids:
            if self._node_of(t) != self.node:
                raise KmstnError(ErrorCode.INVALID_ROUTING, f"{t!r} is not served here")
        device = self.devices.for_link(link.id)
        keys = _retry_briefly(lambda: device.dec_keys(list(notice.key_ids)))
        for k in keys:
            if k.size_bits != notice.size_bits:
                raise KmstnError(ErrorCode.INVALID_ARGUMENT, "key size differs from the notice")
        self._store(keys, notice.initiator_sae_id, notice.target_sae_ids, peer)
        return [AckContainer(notice.key_ids, "relayed", notice.initiator_sae_id,
                             notice.target_sae_ids)]

    def void(self, peer: NodeId, v: VoidContainer, hop: int) -> list[AckContainer]:
        """ETSI 020 ext_keys/void: discard here, or pass on toward the targets' nodes."""
        if hop > MAX_HOPS:
            raise KmstnError(ErrorCode.NO_ROUTE, f"hop limit {MAX_HOPS} reached")
        by_dest: dict[NodeId, list[str]] = defaultdict(list)
        for t in v.target_sae_ids:
            by_dest[self._node_of(t)].append(t)
        acks: list[AckContainer] = []
        for dest, saes in by_dest.items():
            if dest == self.node:
                acks += self.vault.void(v.key_ids, v.initiator_sae_id, saes, v.all_confirmation)
                continue
            nxt = self.routing.route_to_node(dest).next_hop
            if nxt is None or nxt == peer:
                raise KmstnError(ErrorCode.INVALID_ROUTING,
                                 "the route to the targets leads back to the sender")
            body = etsi020.void_json(VoidContainer(v.key_ids, v.initiator_sae_id, tuple(saes),
                                                   None, v.all_confirmation, v.extension))
            try:
                result = self.relay.forward(nxt, "void", body, hop + 1, self._relay_timeout)
                if result.http_status == 200:
                    acks += etsi020.parse_acks(result.body, allow_empty=v.all_confirmation)
                elif result.acks:
                    acks += result.acks
                else:
                    raise KmstnError(ErrorCode.UNAVAILABLE, f"HTTP {result.http_status}")
            except KmstnError as exc:
                if not v.key_ids or exc.code in _TRANSIENT:
                    # Unreachable for now: a 503 says "send it again" (voids are
                    # idempotent). An ack must name keys, so "all keys" failing
                    # can only be an error.
                    what = "the void of all keys" if not v.key_ids else "the void"
                    raise KmstnError(ErrorCode.UNAVAILABLE,
                                     f"{what} did not reach every KMSTN concerned; "
                                     "send it again", cause=exc.public) from exc
                acks.append(AckContainer(v.key_ids, "failed to void", v.initiator_sae_id,
                                         tuple(saes), exc.public))
        return _merge(acks)


@dataclass(frozen=True, slots=True)
class DeviceKeysNotice:
    """kmstn-only message (always sealed): keys a QKD neighbour took from our shared device."""

    key_ids: tuple[uuid.UUID, ...]
    size_bits: int
    initiator_sae_id: str
    target_sae_ids: tuple[str, ...]
    link_id: str

    def to_json(self) -> bytes:
        return json.dumps({
            "key_ids": [str(k) for k in self.key_ids], "size_bits": self.size_bits,
            "initiator_sae_id": self.initiator_sae_id,
            "target_sae_ids": list(self.target_sae_ids), "link_id": self.link_id,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes) -> DeviceKeysNotice:
        try:
            obj = json.loads(body)
            ids = tuple(parse_key_id(k) for k in obj["key_ids"])
            size = obj["size_bits"]
            if not ids or len(ids) > etsi020.MAX_KEYS or not isinstance(size, int) or size <= 0:
                raise ValueError
            targets = tuple(sae_id(t) for t in obj["target_sae_ids"])
            if not targets:
                raise ValueError
            return cls(ids, size, sae_id(obj["initiator_sae_id"]), targets, str(obj["link_id"]))
        except (KeyError, TypeError, ValueError, KmstnError):
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "malformed device-keys notice",
                             reason="missing_parameters") from None


def _retry_briefly(fn: Callable[[], list[Key]], attempts: int = 5,
                   delay: float = 0.02) -> list[Key]:
    """A real device may make a key readable at the far end a moment after issuing it."""
    for i in range(attempts):
        try:
            return fn()
        except KmstnError as exc:
            if exc.code is not ErrorCode.KEY_NOT_FOUND or i == attempts - 1:
                raise
            time.sleep(delay * (2 ** i))
    raise AssertionError("unreachable")


# Failures that may pass: the void (or delivery) is worth sending again.
_TRANSIENT = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.NO_ROUTE})


def _next_hop(route: RouteLike) -> NodeId:
    if route.next_hop is None:
        raise KmstnError(ErrorCode.INTERNAL, "route has no next hop",
                         cause=f"route to {route.destination} is local")
    return route.next_hop


def _merge(acks: Sequence[AckContainer]) -> list[AckContainer]:
    """ETSI 020 5.2: one container per (status, initiator, targets, message), keys merged."""
    groups: dict[tuple[str, str, tuple[str, ...], str | None], list[uuid.UUID]] = {}
    for a in acks:
        ids = groups.setdefault((a.ack_status, a.initiator_sae_id, a.target_sae_ids,
                                 a.message), [])
        ids.extend(k for k in a.key_ids if k not in ids)
    return [AckContainer(tuple(ids), status, initiator, targets, message)
            for (status, initiator, targets, message), ids in groups.items()]
