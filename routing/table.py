"""Routes as the other services of a node see them: a forwarding table, no graph code.

The routing process (``routing.graph``, scipy) computes one shortest-path
tree from its node and turns it into a :class:`ForwardingTable`: for every
destination node the next hop, the link to it and its kind, the whole path
and its cost, or, if the destination cannot be reached, the links whose being
down cuts it off. Subscribers (``routing.follower``) receive the table and
answer routes from it with the same :class:`Route` objects and the same
errors as :class:`routing.graph.RoutingTable`, so a caller cannot tell which
one answered.

This module and everything it imports stay free of scipy and numpy (an
import test checks it): a gateway or relay process that only follows routes
does not pay for the graph library.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kme.config import Link, LinkKindName
from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId

__all__ = [
    "ForwardingTable",
    "Hop",
    "LinkState",
    "Route",
    "TableEntry",
    "no_route_error",
    "unknown_node_error",
    "unknown_sae_error",
]


@dataclass(frozen=True, slots=True)
class Hop:
    from_node: NodeId
    to_node: NodeId
    link_id: str
    kind: LinkKindName
    cost: float


@dataclass(frozen=True, slots=True)
class Route:
    source: NodeId
    destination: NodeId
    path: tuple[NodeId, ...]
    hops: tuple[Hop, ...]
    total_cost: float
    version: int

    @property
    def is_local(self) -> bool:
        return not self.hops

    @property
    def next_hop(self) -> NodeId | None:
        return self.hops[0].to_node if self.hops else None

    @property
    def next_kind(self) -> LinkKindName | None:
        return self.hops[0].kind if self.hops else None

    @property
    def link_id(self) -> str | None:
        """The link to the next hop (None when local)."""
        return self.hops[0].link_id if self.hops else None


@dataclass(frozen=True, slots=True)
class LinkState:
    link: Link
    up: bool
    cost: float


# The error texts live here, once, so that the graph and the table raise the
# very same KmstnError for the same question.

def unknown_node_error(node: str) -> KmstnError:
    return KmstnError(ErrorCode.UNKNOWN_NODE, f"unknown KMSTN {node!r}")


def unknown_sae_error(sae: str) -> KmstnError:
    # The same text as kme.config.Topology.node_of_sae, which RoutingTable uses.
    return KmstnError(ErrorCode.UNKNOWN_SAE, f"unknown SAE {sae!r}")


def learning_error(what: str) -> KmstnError:
    """An SAE or node not known while this node is still learning link state (just
    started): the federation may well have it, so the caller should ask again."""
    return KmstnError(ErrorCode.UNAVAILABLE, f"{what} is not known yet: this node is still "
                      "learning the federation's link state", retry_after_s=1)


def no_route_error(source: str, destination: str, cut: Iterable[str]) -> KmstnError:
    """NO_ROUTE naming the cut: the down links that would join source's part to the rest."""
    where = f"no path from {source} to {destination}"
    names = list(cut)
    if names:
        return KmstnError(ErrorCode.NO_ROUTE, f"{where}: cut by links down: {', '.join(names)}")
    return KmstnError(ErrorCode.NO_ROUTE, f"{where}: no link joins their parts of the topology")


@dataclass(frozen=True, slots=True)
class TableEntry:
    """Where to send a key for one destination node (see ForwardingTable.Entry in the proto)."""

    destination: NodeId
    # Every node on the path, source first; (source,) for the source itself;
    # empty exactly when the destination cannot be reached.
    path: tuple[NodeId, ...]
    total_cost: float
    # The first hop of the path, what a forwarder needs without walking the
    # path: the neighbour, the link to it and its kind (None when local or
    # unreachable).
    next_hop: NodeId | None
    next_link_id: str | None
    next_kind: LinkKindName | None
    # The hop that enters the destination (None when local or unreachable).
    last_hop: Hop | None
    # Only when unreachable: the links down that cut it off, sorted.
    cut: tuple[str, ...] = ()

    @property
    def reachable(self) -> bool:
        return bool(self.path)


class ForwardingTable:
    """The routes from one node at one topology version; immutable once built."""

    def __init__(self, version: int, self_node: NodeId, entries: Iterable[TableEntry],
                 saes: Mapping[SaeId, NodeId], learning: bool = False) -> None:
        self._version = version
        # Link state still being learned: what is not known yet may exist.
        self.learning = learning
        self._self = self_node
        self._entries = {e.destination: e for e in entries}
        self._saes = dict(saes)
        self._into = self._check()
        # Routes are built on first use and kept: the table never changes, so a
        # route asked again (every key request asks) costs one dict lookup.
        self._routes: dict[NodeId, Route] = {}

    @property
    def version(self) -> int:
        return self._version

    @property
    def self_node(self) -> NodeId:
        return self._self

    @property
    def entries(self) -> Mapping[NodeId, TableEntry]:
        return self._entries

    @property
    def saes(self) -> Mapping[SaeId, NodeId]:
        return self._saes

    def _check(self) -> dict[NodeId, Hop]:
        """The hop into each reachable node, after checking that the paths form one tree.

        Each path must be its last node's parent's path plus that node, joined by
        the entry's last hop; then the hop into each node on a path is that
        node's own last hop, and a route is rebuilt without the table
        repeating hops per destination. A table that breaks this is refused
        whole (ValueError) rather than answered from in part.
        """
        into: dict[NodeId, Hop] = {}
        for dest, e in self._entries.items():
            if not e.path:
                continue
            if (e.path[0] != self._self or e.path[-1] != dest
                    or (len(e.path) == 1) != (dest == self._self)):
                raise ValueError(f"table {self._version}: path of {dest} does not run "
                                 f"from {self._self} to it")
            if len(e.path) == 1:
                if (e.next_hop, e.next_link_id, e.next_kind) != (None, None, None):
                    raise ValueError(f"table {self._version}: a next hop toward itself")
                continue
            parent = self._entries.get(e.path[-2])
            hop = e.last_hop
            if (parent is None or parent.path != e.path[:-1] or hop is None
                    or (hop.from_node, hop.to_node) != (e.path[-2], dest)):
                raise ValueError(f"table {self._version}: path of {dest} is not its "
                                 "parent's path plus its last hop")
            first = self._entries.get(e.path[1])
            first_hop = first.last_hop if first is not None else None
            if first_hop is None or ((e.next_hop, e.next_link_id, e.next_kind)
                                     != (first_hop.to_node, first_hop.link_id, first_hop.kind)):
                raise ValueError(f"table {self._version}: next hop of {dest} is not the "
                                 "first hop of its path")
            into[dest] = hop
        return into

    def entry(self, node: str) -> TableEntry:
        try:
            return self._entries[NodeId(node)]
        except KeyError:
            if self.learning:
                raise learning_error(f"KMSTN {node!r}") from None
            raise unknown_node_error(node) from None

    def node_of_sae(self, sae: str) -> NodeId:
        try:
            return self._saes[SaeId(sae)]
        except KeyError:
            if self.learning:
                raise learning_error(f"SAE {sae!r}") from None
            raise unknown_sae_error(sae) from None

    def route_to_sae(self, sae: str) -> Route:
        return self.route_to_node(self.node_of_sae(sae))

    def route_to_node(self, node: str) -> Route:
        route = self._routes.get(NodeId(node))
        if route is not None:
            return route
        entry = self.entry(node)
        if not entry.reachable:
            raise no_route_error(self._self, entry.destination, entry.cut)
        hops = tuple(self._into[n] for n in entry.path[1:])
        route = Route(self._self, entry.destination, entry.path, hops, entry.total_cost,
                      self._version)
        self._routes[entry.destination] = route
        return route
