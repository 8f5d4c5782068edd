"""Placing keys at their destinations, and taking them back when that fails.

One destination's copy goes one of three ways (paper IV-A, ETSI 020 clause 6):

- **this node**: into the keyvault for the named slaves;
- **the QKD neighbour whose device made the keys**: no key relay at all.
  The key bytes cross only the QKD link; the neighbour gets a sealed
  *device-keys notice* holding just the key IDs and the named SAEs, reads the
  bytes from its own side of the device and keeps them for exactly those SAEs
  (a vendor device knows only the two KMSTNs, not which SAE may take which
  key; the notice is what lets the neighbour refuse an SAE not named);
- **anywhere else**: an ETSI 020 ext_keys toward the slave's node, hop by
  hop, each hop sealed by the relay.

After a failure every copy that may exist is voided (rule 6.3). Voids, and
in concurrent mode the deliveries themselves, are durable jobs
(:class:`~kme.flows.retries.Jobs`): recorded before they are first tried,
retried while the path is broken, resumed after a restart.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from kme.errors import ErrorCode, KmstnError
from kme.etsi020 import AckContainer, ExtKey, ExtKeyContainer, VoidContainer
from kme.flows.context import Context
from kme.flows.messages import DeviceKeysNotice
from kme.flows.ports import Job, RouteLike
from kme.flows.retries import TRANSIENT
from kme.types import Deadline, Key, KeyGrant, NodeId, SecretBytes, parse_key_id

__all__ = ["Delivery", "Placement", "next_hop_of"]

VOID = "void"
DELIVER = "deliver"


def next_hop_of(route: RouteLike) -> NodeId:
    if route.next_hop is None:
        raise KmstnError(ErrorCode.INTERNAL, "route has no next hop",
                         cause=f"route to {route.destination} is local")
    return route.next_hop


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one request's keys go: per destination node, its slaves and its way there."""

    key_ids: tuple[uuid.UUID, ...]
    size_bits: int
    master: str
    by_dest: dict[NodeId, tuple[str, ...]]
    # The QKD link whose device made the keys (None: the CSPRNG), and the
    # neighbour at its other end when that neighbour is a destination (it
    # reads the keys from its own side of the device).
    source_link: str | None = None
    direct: NodeId | None = None
    # The key bytes, needed only for destinations reached by ext_keys.
    keys: tuple[Key, ...] = ()

    @classmethod
    def of(cls, keys: Sequence[Key], master: str, by_dest: dict[NodeId, tuple[str, ...]],
           source_link: str | None, direct: NodeId | None) -> Placement:
        return cls(tuple(k.key_id for k in keys), keys[0].size_bits, master, by_dest,
                   source_link, direct, tuple(keys))


class Delivery:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        ctx.jobs.register(VOID, self._void_job)
        ctx.jobs.register(DELIVER, self._deliver_job, self._deliver_given_up)

    # -- one destination --------------------------------------------------------------

    def store_here(self, keys: Sequence[Key], master: str, allowed: tuple[str, ...],
                   origin: str | None = None, upstream: NodeId | None = None) -> None:
        self._ctx.vault.store([KeyGrant(k, master, allowed, origin or self._ctx.node, upstream)
                               for k in keys])

    def ext_keys_to(self, next_hop: NodeId, keys: Sequence[ExtKey], initiator: str,
                    targets: tuple[str, ...], hop_no: int, deadline: Deadline,
                    extension_optional: dict[str, Any] | None = None) -> list[AckContainer]:
        """Send keys toward ``targets`` through ``next_hop``; the acks, all 'relayed'."""
        container = ExtKeyContainer(keys=tuple(keys), initiator_sae_id=initiator,
                                    target_sae_ids=targets,
                                    extension_optional=extension_optional)
        acks = self._ctx.hop.send(next_hop, container, hop_no, deadline)
        check_relayed(acks, {k.key_id for k in keys})
        return acks

    def device_keys_to(self, neighbour: NodeId, link_id: str, key_ids: Sequence[uuid.UUID],
                       size_bits: int, initiator: str, targets: tuple[str, ...],
                       deadline: Deadline) -> None:
        notice = DeviceKeysNotice(tuple(key_ids), size_bits, initiator, targets, link_id)
        acks = self._ctx.hop.send(neighbour, notice, 1, deadline)
        check_relayed(acks, set(notice.key_ids))

    def to_destination(self, p: Placement, dest: NodeId, deadline: Deadline) -> None:
        """Place ``p``'s keys at ``dest`` (not this node); raises unless they are stored."""
        saes = p.by_dest[dest]
        if dest == p.direct and p.source_link is not None:
            self.device_keys_to(dest, p.source_link, p.key_ids, p.size_bits, p.master, saes,
                                deadline)
            return
        hop = next_hop_of(self._ctx.routes.route_to_node(dest))
        self.ext_keys_to(hop, [ExtKey(k.key_id, k.material) for k in p.keys], p.master, saes,
                         1, deadline)

    # -- all destinations ------------------------------------------------------------------

    def run_all(self, jobs: list[tuple[NodeId, Callable[[], None]]], deadline: Deadline
                ) -> dict[NodeId, KmstnError]:
        failures: dict[NodeId, KmstnError] = {}
        if len(jobs) == 1:  # the common case: no thread hop
            dest, job = jobs[0]
            try:
                job()
            except KmstnError as exc:
                failures[dest] = exc
            return failures
        futures: list[tuple[NodeId, Future[None]]] = [(d, self._ctx.pool.submit(j))
                                                      for d, j in jobs]
        for dest, fut in futures:
            try:
                fut.result(timeout=max(0.0, deadline.remaining()) + 1)
            except KmstnError as exc:
                failures[dest] = exc
            except FutureTimeout:
                failures[dest] = KmstnError(ErrorCode.TIMEOUT, "delivery timed out")
        return failures

    def confirmed(self, p: Placement, deadline: Deadline) -> None:
        """Place every remote copy now; on any failure void them all and raise (503)."""
        remote = [d for d in p.by_dest if d != self._ctx.node]
        failures = self.run_all([(d, lambda d=d: self.to_destination(p, d, deadline))  # type: ignore[misc]
                                 for d in remote], deadline)
        if failures:
            self.void_everywhere(p, failures, deadline)
            first = next(iter(failures.values()))
            raise KmstnError(ErrorCode.UNAVAILABLE,
                             "keys could not be delivered to every slave's KMSTN",
                             cause="; ".join(f"{d}: {e.code.name} {e.public}"
                                             for d, e in failures.items())
                             + (f" ({first.cause})" if first.cause else ""))

    def void_everywhere(self, p: Placement, failures: dict[NodeId, KmstnError],
                        deadline: Deadline) -> None:
        """ETSI 020 rule 6.3: after a failure, void every copy that may exist.

        Each void is a durable job, retried until the path is back. A
        destination whose answer we stopped waiting for may still be storing
        the keys until the request's deadline, so its void waits for that
        deadline; one that answered is done and is voided at once.
        """
        jobs = []
        for dest, saes in p.by_dest.items():
            failed = failures.get(dest)
            if failed is not None and failed.reason == "refused":
                continue  # 400/401: the neighbour kept nothing (rule 6.2)
            in_doubt = failed is not None and (failed.code is ErrorCode.TIMEOUT
                                               or failed.reason == "in_doubt")
            not_before = deadline.unix_ms if in_doubt else 0
            jobs.append(self._ctx.jobs.new(VOID, dest, _void_payload(p.key_ids, p.master, saes),
                                           not_before))
        self._ctx.jobs.submit(jobs)
        self._ctx.log.warning("keys voided after a failed delivery", extra={
            "key_ids": [str(k) for k in p.key_ids], "failed": sorted(failures),
            "placed": [d for d in p.by_dest if d not in failures]})

    def concurrent(self, p: Placement) -> None:
        """The paper's mode: record every remote delivery durably, deliver in the background."""
        jobs = [self._ctx.jobs.new(DELIVER, dest, _deliver_payload(p, dest))
                for dest in p.by_dest if dest != self._ctx.node]
        self._ctx.jobs.submit(jobs)

    # -- durable jobs ------------------------------------------------------------------------

    def void_at(self, dest: NodeId, ids: tuple[uuid.UUID, ...], master: str,
                saes: tuple[str, ...], deadline: Deadline) -> None:
        """Void ``ids`` for ``saes`` at ``dest``; raises unless the answer is final."""
        if dest == self._ctx.node:
            self._ctx.vault.void(ids, master, saes)
            return
        hop = next_hop_of(self._ctx.routes.route_to_node(dest))
        try:
            self._ctx.hop.send(hop, VoidContainer(ids, master, saes), 1, deadline)
        except KmstnError as exc:
            if exc.code in TRANSIENT:
                raise  # some node on the way could not pass it on: again later
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "the void was refused",
                             cause=f"{exc.code.name}: {exc.public}") from None

    def _void_job(self, job: Job) -> None:
        doc = json.loads(job.payload.reveal())
        self.void_at(NodeId(job.destination_node_id), tuple(uuid.UUID(k) for k in doc["key_ids"]),
                     doc["initiator"], tuple(doc["targets"]),
                     Deadline.after(self._ctx.relay_timeout))

    def _deliver_job(self, job: Job) -> None:
        p = _placement_of(job)
        self.to_destination(p, NodeId(job.destination_node_id),
                            Deadline.after(self._ctx.relay_timeout))

    def _deliver_given_up(self, job: Job, exc: KmstnError) -> None:
        # The master already holds the keys, but this destination will never
        # get them: void whatever may have arrived there (rule 6.3).
        self.void_everywhere(_placement_of(job), {NodeId(job.destination_node_id): exc},
                             Deadline.after(0))


def check_relayed(acks: Sequence[AckContainer], key_ids: set[uuid.UUID]) -> None:
    """Raise unless the neighbour acknowledged every key as relayed."""
    relayed = {k for a in acks if a.ack_status == "relayed" for k in a.key_ids}
    if not key_ids <= relayed:
        why = "; ".join(f"{a.ack_status}: {a.message or ''}" for a in acks
                        if a.ack_status != "relayed")
        raise KmstnError(ErrorCode.UNAVAILABLE, "a destination did not store the keys",
                         cause=why or "keys missing from the acks")


def _void_payload(ids: Sequence[uuid.UUID], master: str, saes: Sequence[str]) -> bytes:
    return json.dumps({"key_ids": [str(k) for k in ids], "initiator": master,
                       "targets": list(saes)}, separators=(",", ":")).encode()


def _deliver_payload(p: Placement, dest: NodeId) -> bytes:
    doc: dict[str, Any] = {"initiator": p.master, "targets": list(p.by_dest[dest]),
                           "size_bits": p.size_bits, "key_ids": [str(k) for k in p.key_ids]}
    if dest == p.direct and p.source_link is not None:
        doc["source_link"] = p.source_link  # the bytes stay on the devices
    else:
        doc["values"] = [k.material.b64() for k in p.keys]
    return json.dumps(doc, separators=(",", ":")).encode()


def _placement_of(job: Job) -> Placement:
    doc = json.loads(job.payload.reveal())
    size = int(doc["size_bits"])
    ids = tuple(parse_key_id(k) for k in doc["key_ids"])
    dest = NodeId(job.destination_node_id)
    by_dest = {dest: tuple(doc["targets"])}
    if "source_link" in doc:
        return Placement(ids, size, doc["initiator"], by_dest, doc["source_link"], dest)
    keys = tuple(Key(k, SecretBytes.from_b64(v), size)
                 for k, v in zip(ids, doc["values"], strict=True))
    return Placement(ids, size, doc["initiator"], by_dest, keys=keys)
