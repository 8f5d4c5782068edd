"""Typed client of the Routing service, for the other services of a node."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from kme.channels import call
from kme.rpc.v1 import linkstate_pb2, routing_pb2, routing_pb2_grpc
from routing.convert import route_from_proto
from routing.table import Route

__all__ = ["RoutingClient"]


class RoutingClient:
    def __init__(self, channel: grpc.Channel, timeout: float = 2.0) -> None:
        self._stub = routing_pb2_grpc.RoutingStub(channel)
        self._timeout = timeout

    def route_to_sae(self, sae: str) -> Route:
        msg = call(self._stub.Route, routing_pb2.RouteRequest(sae_id=sae), self._timeout)
        return route_from_proto(msg)

    def route_to_node(self, node: str) -> Route:
        msg = call(self._stub.Route, routing_pb2.RouteRequest(node_id=node), self._timeout)
        return route_from_proto(msg)

    def set_link_state(self, link_id: str, up: bool, cost: float | None = None) -> None:
        req = routing_pb2.LinkStateUpdate(link_id=link_id, up=up)
        if cost is not None:
            req.cost = cost
        call(self._stub.SetLinkState, req, self._timeout)

    def topology(self) -> routing_pb2.TopologySnapshot:
        return call(self._stub.Topology, routing_pb2.TopologyRequest(), self._timeout)

    def route(self, sae: str) -> routing_pb2.RouteResponse:
        """The Route RPC's answer as sent (with each hop's cost terms)."""
        return call(self._stub.Route, routing_pb2.RouteRequest(sae_id=sae), self._timeout)

    # -- link state (the relay is the caller) ----------------------------------------

    def submit_link_state(self, from_node: str, records: Sequence[linkstate_pb2.SignedLinkState]
                          ) -> routing_pb2.FloodInstructions:
        return call(self._stub.SubmitLinkState, routing_pb2.SubmitLinkStateRequest(
            from_node_id=from_node, records=records), self._timeout)

    def report_local_state(self, state: routing_pb2.LocalState) -> routing_pb2.FloodInstructions:
        return call(self._stub.ReportLocalState, state, self._timeout)

    def link_state_sync(self, from_node: str, headers: Sequence[linkstate_pb2.LinkStateHeader],
                        headers_only: bool = False) -> routing_pb2.LinkStateSyncResponse:
        return call(self._stub.LinkStateSync, routing_pb2.LinkStateSyncRequest(
            from_node_id=from_node, headers=headers, headers_only=headers_only), self._timeout)

    def link_state_database(self) -> routing_pb2.LinkStateDatabaseView:
        return call(self._stub.LinkStateDatabase, routing_pb2.LinkStateDatabaseRequest(),
                    self._timeout)
