"""Conversions between routing domain objects and kme.rpc.v1 messages.

Free of scipy and numpy (like ``routing.table``): subscribers of the
forwarding table use it.
"""

from __future__ import annotations

from typing import cast

from kme.acks import kind_from_proto, kind_to_proto
from kme.rpc.v1 import common_pb2, routing_pb2
from kme.types import NodeId, SaeId
from routing.table import ForwardingTable, Hop, LinkState, Route, TableEntry

__all__ = [
    "kind_from_proto",
    "kind_to_proto",
    "link_state_to_proto",
    "route_from_proto",
    "route_to_proto",
    "table_from_proto",
    "table_to_proto",
]

def hop_to_proto(h: Hop) -> routing_pb2.Hop:
    return routing_pb2.Hop(from_node_id=h.from_node, to_node_id=h.to_node, link_id=h.link_id,
                           kind=kind_to_proto(h.kind), cost=h.cost)


def hop_from_proto(h: routing_pb2.Hop) -> Hop:
    return Hop(NodeId(h.from_node_id), NodeId(h.to_node_id), h.link_id, kind_from_proto(h.kind),
               h.cost)


def route_to_proto(route: Route) -> routing_pb2.RouteResponse:
    return routing_pb2.RouteResponse(
        source_node_id=route.source,
        destination_node_id=route.destination,
        path=list(route.path),
        hops=[hop_to_proto(h) for h in route.hops],
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
        hops=tuple(hop_from_proto(h) for h in msg.hops),
        total_cost=msg.total_cost,
        version=msg.topology_version,
    )


def link_state_to_proto(state: LinkState) -> routing_pb2.LinkState:
    return routing_pb2.LinkState(
        link_id=state.link.id, a_node_id=state.link.a, b_node_id=state.link.b,
        kind=kind_to_proto(state.link.kind), up=state.up, cost=state.cost,
    )


def table_to_proto(table: ForwardingTable) -> routing_pb2.ForwardingTable:
    entries = []
    for e in table.entries.values():
        msg = routing_pb2.ForwardingTable.Entry(
            destination_node_id=e.destination, next_hop_node_id=e.next_hop or "",
            next_link_id=e.next_link_id or "", next_hop_kind=kind_to_proto(e.next_kind),
            total_cost=e.total_cost, path=e.path, cut_link_ids=e.cut)
        if e.last_hop is not None:
            msg.last_hop.CopyFrom(hop_to_proto(e.last_hop))
        entries.append(msg)
    return routing_pb2.ForwardingTable(
        version=table.version, self_node_id=table.self_node, entries=entries,
        saes=[routing_pb2.SaeInfo(sae_id=s, node_id=n) for s, n in table.saes.items()],
        learning=table.learning)


def table_from_proto(msg: routing_pb2.ForwardingTable) -> ForwardingTable:
    """The domain table; ValueError if the message does not describe one tree of paths."""
    try:
        return _table_from_proto(msg)
    except KeyError as exc:  # a link kind this version does not know
        raise ValueError(f"table {msg.version}: unknown link kind {exc}") from None


def _table_from_proto(msg: routing_pb2.ForwardingTable) -> ForwardingTable:
    # Once per link change in every subscriber, for every node: NodeId() is
    # applied by cast, not called per path element (it costs a third of the
    # parse at 10,000 nodes).
    entries = [
        TableEntry(
            destination=NodeId(e.destination_node_id),
            path=cast("tuple[NodeId, ...]", tuple(e.path)),
            total_cost=e.total_cost,
            next_hop=NodeId(e.next_hop_node_id) if e.next_hop_node_id else None,
            next_link_id=e.next_link_id or None,
            next_kind=(kind_from_proto(e.next_hop_kind)
                       if e.next_hop_kind != common_pb2.LINK_KIND_UNSPECIFIED else None),
            last_hop=hop_from_proto(e.last_hop) if e.HasField("last_hop") else None,
            cut=tuple(e.cut_link_ids),
        )
        for e in msg.entries
    ]
    return ForwardingTable(msg.version, NodeId(msg.self_node_id), entries,
                           {SaeId(s.sae_id): NodeId(s.node_id) for s in msg.saes},
                           learning=msg.learning)
