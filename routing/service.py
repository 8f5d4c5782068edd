"""The kme.rpc.v1.Routing gRPC servicer: proto in, RoutingTable, proto out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import routing_pb2, routing_pb2_grpc
from routing.convert import link_state_to_proto, route_to_proto, table_to_proto
from routing.graph import RoutingTable

__all__ = ["DEFAULT_HEARTBEAT_S", "RoutingService"]

DEFAULT_HEARTBEAT_S = 15


class RoutingService(routing_pb2_grpc.RoutingServicer):
    def __init__(self, table: RoutingTable, log: logging.Logger) -> None:
        self._table = table
        self._log = log
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
        return route_to_proto(route)

    def SetLinkState(  # noqa: N802
        self, request: routing_pb2.LinkStateUpdate, context: grpc.ServicerContext
    ) -> routing_pb2.LinkState:
        cost = request.cost if request.HasField("cost") else None
        state = self._table.set_link_state(request.link_id, request.up, cost)
        self._log.info("link state changed", extra={"link_id": state.link.id, "up": state.up,
                                                     "cost": state.cost,
                                                     "topology_version": self._table.version})
        return link_state_to_proto(state)

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

    def _forwarding_table(self) -> routing_pb2.ForwardingTable:
        with self._pushed_lock:
            table = self._table.forwarding_table()
            if self._pushed is None or self._pushed.version != table.version:
                self._pushed = table_to_proto(table)
            return self._pushed

    def _snapshot(self) -> routing_pb2.TopologySnapshot:
        topo = self._table.topology
        version, links = self._table.links()
        return routing_pb2.TopologySnapshot(
            self_node_id=self._table.self_node or "",
            version=version,
            nodes=[
                routing_pb2.NodeInfo(node_id=k.id, host=k.host, etsi014_port=k.etsi014_port,
                                     etsi020_port=k.etsi020_port, relay_port=k.relay_port,
                                     kind=k.kind)
                for k in topo.kmstns.values()
            ],
            links=[link_state_to_proto(s) for s in links],
            saes=[routing_pb2.SaeInfo(sae_id=s, node_id=n) for s, n in topo.saes.items()],
        )
