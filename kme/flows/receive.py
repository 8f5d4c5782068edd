"""What this node does with an ETSI 020 message a neighbour sent (ETSI 020 clause 6).

ext_keys: keep the keys for targets served here, forward the rest toward
their nodes, answer with one ack container per outcome. device_keys (kmstn
only): a QKD neighbour took keys from our shared device for SAEs served
here; read them from our side and keep them. void: discard here, or pass on
toward the targets' nodes. ack: hand it to the send waiting for it.

Everything that can refuse a request with 400/401 is checked before anything
is kept (rule 6.2). A message that has made MAX_HOPS hops is refused.

Asynchronous mode (a foreign KMS's request with ``ack_callback_url``):
:meth:`Receiver.accept` checks what can be checked now, answers at once
(202), does the work in the background and POSTs the acks to the callback as
a durable job; if the ack cannot be delivered, the keys it acknowledged are
voided (rule 6.4).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kme import etsi020
from kme.errors import ErrorCode, KmstnError
from kme.etsi020 import AckContainer, ExtKeyContainer, VoidContainer
from kme.flows.context import MAX_HOPS, Context
from kme.flows.delivery import Delivery
from kme.flows.messages import AckMessage, DeviceKeysNotice
from kme.flows.ports import Job
from kme.flows.retries import TRANSIENT
from kme.types import Deadline, Key, NodeId

__all__ = ["Plan", "Receiver", "merge_acks"]

ACK = "ack"


@dataclass(frozen=True, slots=True)
class Plan:
    """Where each target's keys go: validated before anything is kept."""

    local: tuple[str, ...]
    remote: dict[NodeId, tuple[NodeId, tuple[str, ...]]]  # dest -> (next hop, targets)


class Receiver:
    def __init__(self, ctx: Context, delivery: Delivery) -> None:
        self._ctx = ctx
        self._delivery = delivery
        ctx.jobs.register(ACK, self._ack_job, self._ack_given_up)

    # -- ext_keys --------------------------------------------------------------------

    def plan(self, peer: NodeId, c: ExtKeyContainer, hop: int) -> Plan:
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
            dest = self._ctx.node_of(t)
            if dest == self._ctx.node:
                local.append(t)
                continue
            if dest in remote:
                remote[dest][1].append(t)
                continue
            nxt = self._ctx.routes.route_to_node(dest).next_hop
            if nxt is None or nxt == peer:
                raise KmstnError(ErrorCode.INVALID_ROUTING,
                                 f"the route to {t!r} leads back to the sender")
            remote[dest] = (nxt, [t])
        self.check_initiator(peer, c.initiator_sae_id)
        return Plan(tuple(local), {d: (h, tuple(ts)) for d, (h, ts) in remote.items()})

    def check_initiator(self, peer: NodeId, initiator: str) -> None:
        """A neighbour may bring keys only for an initiator its position explains.

        The initiator SAE must exist, be served by another node than this one,
        and that node's route toward us must end with ``peer``: the check the
        node makes for targets (the route must not lead back to the sender),
        applied to the initiator. Routes are symmetric shortest paths, so the
        route from the initiator's node to us ends with ``peer`` exactly when
        our route to that node starts with it. Anything else is refused (401,
        ETSI 020 ``unauthorized``) and logged with the neighbour's ID, before
        anything is kept.
        """
        origin = self._ctx.node_of(initiator)  # UNKNOWN_SAE for an SAE nobody serves
        if origin == self._ctx.node:
            why = f"{initiator!r} is served by this node"
        else:
            back = self._ctx.routes.route_to_node(origin).next_hop
            if back == peer:
                return
            why = f"the route to {initiator!r} at {origin} goes through {back}, not {peer}"
        self._ctx.log.warning("ext_keys refused: initiator off the route", extra={
            "peer": peer, "initiator_sae_id": initiator, "cause": why})
        raise KmstnError(ErrorCode.PERMISSION_DENIED,
                         f"{peer} may not bring keys for initiator {initiator!r}", cause=why)

    def ext_keys(self, peer: NodeId, c: ExtKeyContainer, hop: int, deadline: Deadline,
                 plan: Plan | None = None) -> list[AckContainer]:
        """Store or forward an incoming ext_keys; the answer is its ack containers."""
        plan = plan or self.plan(peer, c, hop)
        keys = [Key(k.key_id, k.value, len(k.value) * 8) for k in c.keys]
        origin = self._ctx.origin_of(c.initiator_sae_id, peer)
        acks: list[AckContainer] = []

        def ack(targets: Sequence[str], status: str, message: str | None = None) -> None:
            acks.append(AckContainer(c.key_ids, status, c.initiator_sae_id, tuple(targets),
                                     message))

        if plan.local:
            try:
                deadline.require("storing the keys")
                self._delivery.store_here(keys, c.initiator_sae_id, plan.local, origin, peer)
                ack(plan.local, "relayed")
            except KmstnError as exc:
                if exc.code is ErrorCode.KEY_CONFLICT and not plan.remote:
                    raise  # nothing new was kept: 400 (ETSI 020 rule 6.2)
                ack(plan.local, "failed", exc.public)
        onward = deadline.for_next_hop()
        jobs = [(dest, functools.partial(self._delivery.ext_keys_to, nxt, c.keys,
                                         c.initiator_sae_id, targets, hop + 1, onward,
                                         c.extension_optional))
                for dest, (nxt, targets) in plan.remote.items()]
        failures = self._delivery.run_all(jobs, deadline)  # type: ignore[arg-type]
        for dest, (_, targets) in plan.remote.items():
            failure = failures.get(dest)
            ack(targets, "relayed" if failure is None else "failed",
                None if failure is None else failure.public)
        self._ctx.log.info("ext_keys handled", extra={
            "peer": peer, "hop": hop, "key_ids": [str(k) for k in c.key_ids],
            "local": list(plan.local), "forwarded": [str(d) for d in plan.remote],
            "failed": [str(d) for d in failures]})
        return merge_acks(acks)

    # -- device_keys -----------------------------------------------------------------

    def device_keys(self, peer: NodeId, notice: DeviceKeysNotice, deadline: Deadline
                    ) -> list[AckContainer]:
        """A QKD neighbour took keys from our shared device for SAEs served here."""
        link = self._ctx.qkd_links.get(peer)
        if link is None or link.id != notice.link_id:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             f"{peer} shares no QKD link {notice.link_id!r} with "
                             f"{self._ctx.node}")
        for t in notice.target_sae_ids:
            if self._ctx.node_of(t) != self._ctx.node:
                raise KmstnError(ErrorCode.INVALID_ROUTING, f"{t!r} is not served here")
        if self._ctx.node_of(notice.initiator_sae_id) != peer:
            # The neighbour took the keys from its own side of the device: for
            # one of its own SAEs, never in another node's name.
            self._ctx.log.warning("device_keys refused: initiator not at the neighbour", extra={
                "peer": peer, "initiator_sae_id": notice.initiator_sae_id})
            raise KmstnError(ErrorCode.PERMISSION_DENIED,
                             f"{peer} may not take device keys for "
                             f"{notice.initiator_sae_id!r}")
        device = self._ctx.devices.for_link(link.id)
        keys = _retry_briefly(lambda: device.dec_keys(list(notice.key_ids)))
        for k in keys:
            if k.size_bits != notice.size_bits:
                raise KmstnError(ErrorCode.INVALID_ARGUMENT, "key size differs from the notice")
        deadline.require("storing the keys")
        self._delivery.store_here(keys, notice.initiator_sae_id, notice.target_sae_ids, peer,
                                  peer)
        return [AckContainer(notice.key_ids, "relayed", notice.initiator_sae_id,
                             notice.target_sae_ids)]

    # -- void --------------------------------------------------------------------------

    def void(self, peer: NodeId | None, v: VoidContainer, hop: int, deadline: Deadline
             ) -> list[AckContainer]:
        """ETSI 020 ext_keys/void: discard here, or pass on toward the targets' nodes."""
        if hop > MAX_HOPS:
            raise KmstnError(ErrorCode.NO_ROUTE, f"hop limit {MAX_HOPS} reached")
        by_dest: dict[NodeId, list[str]] = defaultdict(list)
        for t in v.target_sae_ids:
            by_dest[self._ctx.node_of(t)].append(t)
        acks: list[AckContainer] = []
        for dest, saes in by_dest.items():
            if dest == self._ctx.node:
                # A neighbour may void only keys that came from it (issue 16).
                acks += self._ctx.vault.void(v.key_ids, v.initiator_sae_id, saes,
                                             v.all_confirmation, upstream=peer)
                continue
            nxt = self._ctx.routes.route_to_node(dest).next_hop
            if nxt is None or nxt == peer:
                raise KmstnError(ErrorCode.INVALID_ROUTING,
                                 "the route to the targets leads back to the sender")
            onward = VoidContainer(v.key_ids, v.initiator_sae_id, tuple(saes), None,
                                   v.all_confirmation, v.extension)
            try:
                acks += self._ctx.hop.send(nxt, onward, hop + 1, deadline.for_next_hop())
            except KmstnError as exc:
                if not v.key_ids or exc.code in TRANSIENT:
                    # Unreachable for now: a 503 says "send it again" (voids are
                    # idempotent). An ack must name keys, so "all keys" failing
                    # can only be an error.
                    what = "the void of all keys" if not v.key_ids else "the void"
                    raise KmstnError(ErrorCode.UNAVAILABLE,
                                     f"{what} did not reach every KMSTN concerned; "
                                     "send it again", cause=exc.public) from exc
                acks.append(AckContainer(v.key_ids, "failed to void", v.initiator_sae_id,
                                         tuple(saes), exc.public))
        return merge_acks(acks)

    # -- acks ---------------------------------------------------------------------------

    def acks(self, peer: NodeId, acks: Sequence[AckContainer]) -> None:
        """An ack a foreign KMS POSTed to our callback (ETSI 020 ext_keys/ack)."""
        unknown = self._ctx.hop.acks_arrived(peer, acks)
        if unknown:
            raise KmstnError(ErrorCode.KEY_NOT_FOUND,
                             "no ext_keys or void was pending for: "
                             + ", ".join(map(str, unknown)), reason="key_not_present")

    # -- asynchronous mode ------------------------------------------------------------------

    def accept(self, peer: NodeId, message: ExtKeyContainer | VoidContainer, hop: int,
               deadline: Deadline) -> None:
        """Clause 3: check now (a refusal is the answer), work in the background, ack later."""
        url = message.ack_callback_url
        if url is None:
            raise KmstnError(ErrorCode.INTERNAL, "accept() needs an ack_callback_url")
        work: Callable[[], list[AckContainer]]
        if isinstance(message, ExtKeyContainer):
            plan = self.plan(peer, message, hop)
            failed_status = "failed"
            work = functools.partial(self.ext_keys, peer, message, hop, deadline, plan)
        else:
            failed_status = "failed to void"
            work = functools.partial(self.void, peer, message, hop, deadline)

        def later() -> None:
            try:
                acks = work()
            except KmstnError as exc:
                acks = [AckContainer(message.key_ids, failed_status, message.initiator_sae_id,
                                     message.target_sae_ids, exc.public)
                        ] if message.key_ids else []
                if not message.key_ids:  # a void of all keys: an ack cannot name them
                    self._ctx.log.error(
                        "asynchronous void of all keys failed; no ack can name the keys",
                        extra={"peer": peer, "error": exc.public, "cause": exc.cause})
            if acks:  # nothing voided anywhere: there is nothing to acknowledge
                self._ctx.jobs.submit([self._ctx.jobs.new(ACK, peer, _ack_payload(url, acks))])

        self._ctx.in_background(later)

    def _ack_job(self, job: Job) -> None:
        url, acks = _ack_of(job)
        self._ctx.hop.send(NodeId(job.destination_node_id), AckMessage(tuple(acks), url), 1,
                           Deadline.after(self._ctx.relay_timeout))

    def _ack_given_up(self, job: Job, exc: KmstnError) -> None:
        """ETSI 020 rule 6.4: an ack that never got through voids the keys it acknowledged."""
        _, acks = _ack_of(job)
        for a in acks:
            if a.ack_status != "relayed":
                continue
            try:
                self.void(None, VoidContainer(a.key_ids, a.initiator_sae_id, a.target_sae_ids),
                          0, Deadline.after(self._ctx.relay_timeout))
            except KmstnError as err:
                self._ctx.log.error("void after a failed ack did not finish", extra={
                    "peer": job.destination_node_id, "error": err.public,
                    "key_ids": [str(k) for k in a.key_ids]})


def _ack_payload(url: str, acks: Sequence[AckContainer]) -> bytes:
    return json.dumps({"url": url, "acks": json.loads(etsi020.acks_json(acks))},
                      separators=(",", ":")).encode()


def _ack_of(job: Job) -> tuple[str, list[AckContainer]]:
    doc: dict[str, Any] = json.loads(job.payload.reveal())
    return str(doc["url"]), etsi020.parse_acks(json.dumps(doc["acks"]).encode())


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


def merge_acks(acks: Sequence[AckContainer]) -> list[AckContainer]:
    """ETSI 020 5.2: one container per (status, initiator, targets, message), keys merged."""
    groups: dict[tuple[str, str, tuple[str, ...], str | None], list[uuid.UUID]] = {}
    for a in acks:
        ids = groups.setdefault((a.ack_status, a.initiator_sae_id, a.target_sae_ids,
                                 a.message), [])
        ids.extend(k for k in a.key_ids if k not in ids)
    return [AckContainer(tuple(ids), status, initiator, targets, message)
            for (status, initiator, targets, message), ids in groups.items()]


