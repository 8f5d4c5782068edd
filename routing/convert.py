"""Conversions between routing domain objects and kme.rpc.v1 messages."""

from __future__ import annotations

from kme.config import LinkKindName
from kme.rpc.v1 import common_pb2, routing_pb2
from kme.types import NodeId
from routing.graph import Hop, LinkState, Route

__all__ = ["kind_from_proto", "kind_to_proto", "route_from_proto", "route_to_proto"]

_KINDS: dict[LinkKindName, common_pb2.LinkKind.ValueType] = {
    "qkd": common_pb2.LINK_KIND_QKD,
    "pqc": common_pb2.LINK_KIND_PQC,
    "site": common_pb2.LINK_KIND_SITE,
}
_NAMES = {v: k for k, v in _KINDS.items()}


def kind_to_proto(kind: LinkKindName | None) -> common_pb2.LinkKind.ValueType:
    return _KINDS[kind] if kind else common_pb2.LINK_KIND_UNSPECIFIED


def kind_from_proto(kind: common_pb2.LinkKind.ValueType) -> LinkKindName:
    return _NAMES[kind]


def route_to_proto(route: Route) -> routing_pb2.RouteResponse:
    return routing_pb2.RouteResponse(
        source_node_id=route.source,
        destination_node_id=route.destination,
        path=list(route.path),
        hops=[
            routing_pb2.Hop(from_node_id=h.from_node, to_node_id=h.to_node, link_id=h.link_id,
                            kind=kind_to_proto(h.kind), cost=h.cost)
            for h in route.hops
        ],
        next_hop_node_id=route.next_hop or "",
        next_hop_kind=kind_to_proto(route.next_kind),
        total_cost=route.total_cost,
        topology_version=route.version,
    )


def route_from_proto(msg: routing_pb2.RouteResponse) -> Route:
    return Route(
        source=NodeId(msg.source_node_id),
        destination=NodeId(msg.destination_node_id),
        path=tuple(NodeId(n) for n in msg.path),
        hops=tuple(
            Hop(NodeId(h.from_node_id), NodeId(h.to_node_id), h.link_id,
                kind_from_proto(h.kind), h.cost)
            for h in msg.hops
        ),
        total_cost=msg.total_cost,
        version=msg.topology_version,
    )


def link_state_to_proto(state: LinkState) -> routing_pb2.LinkState:
    return routing_pb2.LinkState(
        link_id=state.link.id, a_node_id=state.link.a, b_node_id=state.link.b,
        kind=kind_to_proto(state.link.kind), up=state.up, cost=state.cost,
    )
