"""The kme.rpc.v1.Routing gRPC servicer: proto in, RoutingTable (and link state), proto out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import linkstate_pb2, routing_pb2, routing_pb2_grpc
from kme.types import NodeId, node_id
from routing.convert import link_state_to_proto, route_to_proto, table_to_proto
from routing.engine import Sends
from routing.graph import RoutingTable
from routing.learned import LearnedRouting
from routing.origin import DeviceReading
from routing.records import Signed

__all__ = ["DEFAULT_HEARTBEAT_S", "RoutingService"]

DEFAULT_HEARTBEAT_S = 15


def _instructions(sends: Sends, digest: str) -> routing_pb2.FloodInstructions:
    return routing_pb2.FloodInstructions(
        sends=[routing_pb2.FloodInstructions.Send(
            to_node_id=node, records=[r.to_proto() for r in records])
            for node, records in sends.by_node.items() if records],
        digest=digest)


def _headers(headers: dict[NodeId, int]) -> list[linkstate_pb2.LinkStateHeader]:
    return [linkstate_pb2.LinkStateHeader(origin_node_id=o, sequence=s)
            for o, s in sorted(headers.items())]


class RoutingService(routing_pb2_grpc.RoutingServicer):
    def __init__(self, table: RoutingTable, log: logging.Logger,
                 learned: LearnedRouting | None = None) -> None:
        self._table = table
        self._log = log
        self._learned = learned
        # The message of the latest forwarding table, built once per version
        # and sent to every subscriber (the gateway and relay processes).
        self._pushed: routing_pb2.ForwardingTable | None = None
        self._pushed_lock = threading.Lock()

    def Route(  # noqa: N802 - gRPC method name
        self, request: routing_pb2.RouteRequest, context: grpc.ServicerContext
    ) -> routing_pb2.RouteResponse:
        source = request.source_node_id or None
        which = request.WhichOneof("destination")
        if which == "sae_id" and request.sae_id:
            route = self._table.route_to_sae(request.sae_id, source)  # type: ignore[arg-type]
        elif which == "node_id" and request.node_id:
            route = self._table.route_to_node(request.node_id, source)
        else:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             "a destination sae_id or node_id is required")
        msg = route_to_proto(route)
        if self._learned is not None:
            # The cost terms behind each hop: what each end announced.
            for hop in msg.hops:
                link = self._learned.db.link(hop.link_id)
                for end, announced in (link.ends if link is not None else ()):
                    hop.ends.append(routing_pb2.AnnouncedEnd(node_id=end,
                                                             link=announced.to_proto()))
        return msg

    def SetLinkState(  # noqa: N802
        self, request: routing_pb2.LinkStateUpdate, context: grpc.ServicerContext
    ) -> routing_pb2.LinkState:
        cost = request.cost if request.HasField("cost") else None
        state = self._table.set_link_state(request.link_id, request.up, cost)
        own = False
        if self._learned is not None:
            # A link of this node: its next record says so, for every node.
            own = self._learned.override(request.link_id, request.up, cost)
            state = next((s for s in self._table.links()[1] if s.link.id == request.link_id),
                         state)
        self._log.info("link state changed", extra={"link_id": state.link.id, "up": state.up,
                                                     "cost": state.cost, "announced": own,
                                                     "topology_version": self._table.version})
        msg = link_state_to_proto(state)
        msg.overridden = request.link_id in self._table.overrides()
        return msg

    def Topology(  # noqa: N802
        self, request: routing_pb2.TopologyRequest, context: grpc.ServicerContext
    ) -> routing_pb2.TopologySnapshot:
        return self._snapshot()

    def WatchTable(  # noqa: N802
        self, request: routing_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[routing_pb2.ForwardingTable]:
        heartbeat = float(request.heartbeat_seconds or DEFAULT_HEARTBEAT_S)
        sent, last = -1, 0.0
        while context.is_active():
            # Wake at least once a second to notice a client that went away.
            version = self._table.wait_for_change(sent, min(1.0, heartbeat))
            now = time.monotonic()
            if version != sent or now - last >= heartbeat:
                msg = self._forwarding_table()
                sent, last = msg.version, now
                yield msg

    # -- link state, from this node's relay ---------------------------------------------

    def _require_learned(self) -> LearnedRouting:
        if self._learned is None:
            raise KmstnError(ErrorCode.INVALID_ROUTING,
                             "this node routes as configured (no [linkstate] in its file)")
        return self._learned

    def SubmitLinkState(  # noqa: N802
        self, request: routing_pb2.SubmitLinkStateRequest, context: grpc.ServicerContext
    ) -> routing_pb2.FloodInstructions:
        learned = self._require_learned()
        sender = node_id(request.from_node_id)
        sends = learned.submit(sender, [Signed.from_proto(r) for r in request.records])
        return _instructions(sends, learned.engine.digest)

    def ReportLocalState(  # noqa: N802
        self, request: routing_pb2.LocalState, context: grpc.ServicerContext
    ) -> routing_pb2.FloodInstructions:
        learned = self._require_learned()
        neighbours = {NodeId(n.node_id): n.up for n in request.neighbours}
        devices = {d.link_id: DeviceReading(d.reachable,
                                            d.rate_bps if d.rate_bps >= 0 else None,
                                            int(d.stored_keys), int(d.max_keys))
                   for d in request.devices}
        sends = learned.report(neighbours, devices)
        return _instructions(sends, learned.engine.digest)

    def LinkStateSync(  # noqa: N802
        self, request: routing_pb2.LinkStateSyncRequest, context: grpc.ServicerContext
    ) -> routing_pb2.LinkStateSyncResponse:
        learned = self._require_learned()
        theirs = {h.origin_node_id: int(h.sequence) for h in request.headers}
        records: list[Signed] = []
        if request.headers_only:  # the relay's first step of each sync: ours only
            ours = learned.db.headers()
        else:
            records, ours = learned.sync(node_id(request.from_node_id), theirs)
        return routing_pb2.LinkStateSyncResponse(records=[r.to_proto() for r in records],
                                                 headers=_headers(ours))

    def LinkStateDatabase(  # noqa: N802
        self, request: routing_pb2.LinkStateDatabaseRequest, context: grpc.ServicerContext
    ) -> routing_pb2.LinkStateDatabaseView:
        version, links = self._table.links()
        overridden = self._table.overrides()
        view = routing_pb2.LinkStateDatabaseView(
            self_node_id=self._table.self_node or "", version=version,
            mode="learned" if self._learned is not None else "configured")
        for s in links:
            msg = link_state_to_proto(s)
            msg.overridden = s.link.id in overridden
            view.links.append(msg)
        if self._learned is None:
            return view
        db = self._learned.db
        now_ms = int(time.time() * 1000)
        view.digest = db.digest()
        for _, entry in sorted(db.entries().items()):
            record = entry.verified.record
            view.entries.append(routing_pb2.LinkStateDatabaseView.Entry(
                record=record.to_proto(), age_seconds=(now_ms - record.originated_ms) / 1000,
                signature=f"verified: {entry.verified.signer}",
                received_from=entry.received_from or ""))
        for r in db.refusals():
            view.refused.append(routing_pb2.LinkStateDatabaseView.Refused(
                from_node_id=r.from_node, origin_node_id=r.origin, sequence=r.sequence,
                reason=r.reason, seconds_ago=(now_ms - r.last_ms) / 1000, count=r.count))
        return view

    # -- helpers -------------------------------------------------------------------------

    def _forwarding_table(self) -> routing_pb2.ForwardingTable:
        with self._pushed_lock:
            table = self._table.forwarding_table()
            if self._pushed is None or self._pushed.version != table.version:
                self._pushed = table_to_proto(table)
            return self._pushed

    def _snapshot(self) -> routing_pb2.TopologySnapshot:
        configured = self._table.topology.kmstns
        version, links = self._table.links()
        overridden = self._table.overrides()
        nodes = []
        for n in self._table.nodes():
            k = configured.get(n)
            nodes.append(routing_pb2.NodeInfo(node_id=n) if k is None else routing_pb2.NodeInfo(
                node_id=k.id, host=k.host, etsi014_port=k.etsi014_port,
                etsi020_port=k.etsi020_port, relay_port=k.relay_port, kind=k.kind))
        link_msgs = []
        for s in links:
            msg = link_state_to_proto(s)
            msg.overridden = s.link.id in overridden
            link_msgs.append(msg)
        return routing_pb2.TopologySnapshot(
            self_node_id=self._table.self_node or "",
            version=version,
            nodes=nodes,
            links=link_msgs,
            saes=[routing_pb2.SaeInfo(sae_id=s, node_id=n) for s, n in self._table.saes.items()],
        )

