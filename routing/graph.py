"""Shortest paths over the federation graph, with link state that changes at run time.

The graph has one vertex per KMSTN (or foreign KMS) and one weighted edge per
pair of neighbours: the cheapest link between them that is up (a pair may be
joined by, say, a QKD link and a PQC fallback). Paths come from
``scipy.sparse.csgraph.dijkstra`` with predecessors, computed for one source
at a time and cached per source until the link state changes. All-pairs is
never computed: a node only ever needs its own row.

Thread safety: one lock guards the state; a route computed under version N
is consistent with every other route of version N.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, dijkstra

from kme.config import Link, LinkKindName, Topology
from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId

__all__ = ["Hop", "LinkState", "Route", "RoutingTable"]


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


@dataclass(frozen=True, slots=True)
class LinkState:
    link: Link
    up: bool
    cost: float


class RoutingTable:
    """The graph of one topology plus the current state of each link."""

    def __init__(self, topology: Topology, self_node: NodeId | None = None) -> None:
        self._topology = topology
        self._self = self_node
        self._nodes: list[NodeId] = list(topology.kmstns)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        self._links: dict[str, LinkState] = {
            link.id: LinkState(link, True, link.cost) for link in topology.links
        }
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 1
        self._rebuild()

    # -- state -----------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def self_node(self) -> NodeId | None:
        return self._self

    @property
    def topology(self) -> Topology:
        return self._topology

    def links(self) -> tuple[int, list[LinkState]]:
        with self._lock:
            return self._version, list(self._links.values())

    def set_link_state(self, link_id: str, up: bool, cost: float | None = None) -> LinkState:
        """Take a link down or up, or change its cost; routes change at once."""
        if cost is not None and not cost > 0:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, f"link cost must be > 0, got {cost}")
        with self._lock:
            try:
                old = self._links[link_id]
            except KeyError:
                raise KmstnError(ErrorCode.UNKNOWN_NODE, f"unknown link {link_id!r}") from None
            new = replace(old, up=up, cost=old.cost if cost is None else float(cost))
            if new != old:
                self._links[link_id] = new
                self._version += 1
                self._rebuild()
                self._changed.notify_all()
            return new

    def wait_for_change(self, seen_version: int, timeout: float) -> int:
        """Block until the version differs from ``seen_version`` (or ``timeout``); return it."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != seen_version, timeout)
            return self._version

    def replace_state(self, version: int, states: dict[str, tuple[bool, float]]) -> None:
        """Take another table's link states and version (a replica of the routing service)."""
        with self._lock:
            for link_id, (up, cost) in states.items():
                old = self._links.get(link_id)
                if old is not None:
                    self._links[link_id] = replace(old, up=up, cost=cost)
            self._version = version
            self._rebuild()
            self._changed.notify_all()

    def _rebuild(self) -> None:
        # Cheapest up link per unordered pair: csr_matrix would sum duplicate
        # entries, and dijkstra reads an explicit 0 as "no edge", so both are
        # resolved here (costs are validated > 0).
        best: dict[tuple[int, int], LinkState] = {}
        for state in self._links.values():
            if not state.up:
                continue
            i, j = self._index[state.link.a], self._index[state.link.b]
            pair = (min(i, j), max(i, j))
            current = best.get(pair)
            if current is None or (state.cost, state.link.id) < (current.cost, current.link.id):
                best[pair] = state
        n = len(self._nodes)
        rows = np.fromiter((p[0] for p in best), dtype=np.int32, count=len(best))
        cols = np.fromiter((p[1] for p in best), dtype=np.int32, count=len(best))
        data = np.fromiter((s.cost for s in best.values()), dtype=np.float64, count=len(best))
        self._graph = csr_matrix((data, (rows, cols)), shape=(n, n))
        self._best = best
        self._trees: dict[int, tuple[NDArray[np.float64], NDArray[np.int32]]] = {}

    # -- queries ---------------------------------------------------------------

    def route_to_sae(self, sae: str, source: NodeId | None = None) -> Route:
        return self.route_to_node(self._topology.node_of_sae(sae), source)

    def route_to_node(self, destination: str, source: str | None = None) -> Route:
        src_name = source or self._self
        if src_name is None:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "no source node given")
        src = self._node_index(src_name)
        dst = self._node_index(destination)
        with self._lock:
            version = self._version
            if src == dst:
                node = self._nodes[src]
                return Route(node, node, (node,), (), 0.0, version)
            tree = self._trees.get(src)
            if tree is None:
                dist, pred = dijkstra(self._graph, directed=False, indices=src,
                                      return_predecessors=True)
                tree = (dist, pred)
                self._trees[src] = tree
            dist, pred = tree
            if not np.isfinite(dist[dst]):
                raise self._no_route(src, dst)
            indices = [dst]
            while indices[-1] != src:
                indices.append(int(pred[indices[-1]]))
            indices.reverse()
            hops = []
            for u, v in itertools.pairwise(indices):
                state = self._best[(min(u, v), max(u, v))]
                hops.append(Hop(self._nodes[u], self._nodes[v], state.link.id,
                                state.link.kind, state.cost))
            return Route(self._nodes[src], self._nodes[dst],
                         tuple(self._nodes[i] for i in indices), tuple(hops),
                         float(dist[dst]), version)

    def _node_index(self, node: str) -> int:
        try:
            return self._index[NodeId(node)]
        except KeyError:
            raise KmstnError(ErrorCode.UNKNOWN_NODE, f"unknown KMSTN {node!r}") from None

    def _no_route(self, src: int, dst: int) -> KmstnError:
        """Name the cut: the down links that leave the part of the graph src reaches."""
        _, labels = connected_components(self._graph, directed=False)
        reach = labels[src]
        cut = sorted(
            s.link.id
            for s in self._links.values()
            if not s.up
            and (labels[self._index[s.link.a]] == reach) != (labels[self._index[s.link.b]] == reach)
        )
        where = f"no path from {self._nodes[src]} to {self._nodes[dst]}"
        if cut:
            return KmstnError(ErrorCode.NO_ROUTE, f"{where}: cut by links down: {', '.join(cut)}")
        return KmstnError(ErrorCode.NO_ROUTE, f"{where}: no link joins their parts of the topology")

