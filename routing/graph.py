"""Shortest paths over the federation graph, with link state that changes at run time.

The graph has one vertex per KMSTN (or foreign KMS) and one weighted edge per
pair of neighbours: the cheapest link between them that is up (a pair may be
joined by, say, a QKD link and a PQC fallback). It starts from a topology
(the configured one) and, on a node with signed link state, is replaced by
the learned one (:meth:`RoutingTable.learn`, from routing.lsdb) each time the
link-state database changes. An operator's ``kmstn link`` is kept on top of
either (:meth:`RoutingTable.set_link_state`): it can hold a link down or
re-cost it here, never bring up a link its ends announce down. Paths come from
``scipy.sparse.csgraph.dijkstra`` with predecessors, computed for one source
at a time and cached per source until the link state changes. All-pairs is
never computed: a node only ever needs its own row.

The routing process answers the Route RPC from here, and turns its own
node's tree into a :class:`routing.table.ForwardingTable` (one per version)
that it pushes to the other services, so that only this process imports
scipy. The domain types (Route, Hop, LinkState) live in the scipy-free
``routing.table`` and are re-exported here.

Thread safety: one lock guards the state; a route computed under version N
is consistent with every other route of version N.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, dijkstra

from kme.config import Topology
from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId
from routing.table import (
    ForwardingTable,
    Hop,
    LinkState,
    Route,
    TableEntry,
    learning_error,
    no_route_error,
    unknown_node_error,
    unknown_sae_error,
)

__all__ = ["Hop", "LinkState", "Override", "Route", "RoutingTable"]


@dataclass(frozen=True, slots=True)
class Override:
    """An operator's hold on one link at this node (``kmstn link``)."""

    up: bool
    cost: float | None


class RoutingTable:
    """The graph (configured, or learned from link state) plus the state of each link."""

    def __init__(self, topology: Topology, self_node: NodeId | None = None) -> None:
        self._topology = topology
        self._self = self_node
        self._nodes: list[NodeId] = list(topology.kmstns)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        # Link state as configured or learned, and the operator's overrides
        # over it; _links is the two combined, what routes use.
        self._base: dict[str, LinkState] = {
            link.id: LinkState(link, True, link.cost) for link in topology.links
        }
        self._overrides: dict[str, Override] = {}
        self._links: dict[str, LinkState] = dict(self._base)
        self._saes: dict[SaeId, NodeId] = dict(topology.saes)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 1
        self._forwarding: ForwardingTable | None = None
        # Just started with link state: what is not known yet may exist (set_learning).
        self._learning = False
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
        """The configured topology (with link state, only this node's neighbourhood)."""
        return self._topology

    def links(self) -> tuple[int, list[LinkState]]:
        with self._lock:
            return self._version, list(self._links.values())

    def overrides(self) -> dict[str, Override]:
        with self._lock:
            return dict(self._overrides)

    def nodes(self) -> list[NodeId]:
        with self._lock:
            return list(self._nodes)

    @property
    def saes(self) -> dict[SaeId, NodeId]:
        with self._lock:
            return dict(self._saes)

    def known_saes(self) -> dict[SaeId, NodeId]:
        return self.saes

    def node_of_sae(self, sae: str) -> NodeId:
        with self._lock:
            try:
                return self._saes[SaeId(sae)]
            except KeyError:
                if self._learning:
                    raise learning_error(f"SAE {sae!r}") from None
                raise unknown_sae_error(sae) from None

    @property
    def learning(self) -> bool:
        return self._learning

    def set_learning(self, learning: bool) -> None:
        """While learning (a routing service just started with link state, its database
        not yet synced with its neighbours), an SAE or node not known is UNAVAILABLE
        (ask again), not unknown; the change is a new table version."""
        with self._lock:
            if learning != self._learning:
                self._learning = learning
                self._version += 1
                self._changed.notify_all()

    def set_link_state(self, link_id: str, up: bool, cost: float | None = None) -> LinkState:
        """Hold a link down (or let it up again), or change its cost; routes change at once.

        The hold stays over configured or learned state until lifted: a link
        its ends announce down stays down whatever is set here.
        """
        if cost is not None and not cost > 0:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, f"link cost must be > 0, got {cost}")
        with self._lock:
            if link_id not in self._base:
                raise KmstnError(ErrorCode.UNKNOWN_NODE, f"unknown link {link_id!r}")
            held = self._overrides.get(link_id)
            keep_cost = cost if cost is not None else held.cost if held is not None else None
            if up and keep_cost is None:
                self._overrides.pop(link_id, None)
            else:
                self._overrides[link_id] = Override(up, keep_cost)
            self._apply()
            return self._links[link_id]

    def learn(self, nodes: Iterable[NodeId], links: Iterable[LinkState],
              saes: Mapping[SaeId, NodeId]) -> bool:
        """Replace the graph with what link state says now; True if routes may change.

        ``links`` are every link the records name (those not usable, down);
        ``nodes`` must include both ends of each. Overrides are kept.
        """
        with self._lock:
            new_nodes = sorted(set(nodes) | ({self._self} if self._self else set()))
            new_base = {s.link.id: s for s in links}
            new_saes = dict(saes)
            if (new_nodes == self._nodes and new_base == self._base
                    and new_saes == self._saes):
                return False
            self._nodes = new_nodes
            self._index = {n: i for i, n in enumerate(new_nodes)}
            self._base = new_base
            self._saes = new_saes
            self._overrides = {k: v for k, v in self._overrides.items() if k in new_base}
            self._apply(force=True)
            return True

    def _apply(self, force: bool = False) -> None:
        """Combine base and overrides; a new version if anything changed (lock held)."""
        links = {}
        for link_id, base in self._base.items():
            held = self._overrides.get(link_id)
            links[link_id] = base if held is None else replace(
                base, up=base.up and held.up,
                cost=held.cost if held.cost is not None else base.cost)
        if force or links != self._links:
            self._links = links
            self._version += 1
            self._rebuild()
            self._changed.notify_all()

    def wait_for_change(self, seen_version: int, timeout: float) -> int:
        """Block until the version differs from ``seen_version`` (or ``timeout``); return it."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != seen_version, timeout)
            return self._version

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
        return self.route_to_node(self.node_of_sae(sae), source)

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
            dist, pred = self._tree(src)
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

    def forwarding_table(self) -> ForwardingTable:
        """This node's routes to every node at the current version (built once per version).

        One Dijkstra tree from this node gives every path: each node's path is
        its predecessor's path plus the node, so every path is built from its
        parent's (a tree: what ForwardingTable needs) in time linear in its size.
        """
        if self._self is None:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "no source node given")
        src = self._node_index(self._self)
        with self._lock:
            if self._forwarding is not None and self._forwarding.version == self._version:
                return self._forwarding
            dist, pred = self._tree(src)
            me = self._nodes[src]
            # Per reachable node: its path, the hop into it, the path's first hop.
            paths: dict[int, tuple[NodeId, ...]] = {src: (me,)}
            into: dict[int, Hop] = {}
            first: dict[int, Hop] = {}
            entries = []
            cut: tuple[str, ...] | None = None
            for i, node in enumerate(self._nodes):
                if i == src:
                    entries.append(TableEntry(me, (me,), 0.0, None, None, None, None))
                elif not np.isfinite(dist[i]):
                    cut = self._cut(src) if cut is None else cut
                    entries.append(TableEntry(node, (), 0.0, None, None, None, None, cut))
                else:
                    self._walk(i, pred, paths, into, first)
                    hop = first[i]
                    entries.append(TableEntry(node, paths[i], float(dist[i]), hop.to_node,
                                              hop.link_id, hop.kind, into[i]))
            self._forwarding = ForwardingTable(self._version, me, entries, self._saes,
                                               learning=self._learning)
            return self._forwarding

    def _walk(self, i: int, pred: NDArray[np.int32], paths: dict[int, tuple[NodeId, ...]],
              into: dict[int, Hop], first: dict[int, Hop]) -> None:
        """Fill in the path of ``i`` and of its ancestors not yet seen, root side first."""
        chain = []
        while i not in paths:
            chain.append(i)
            i = int(pred[i])
        for j in reversed(chain):
            parent = int(pred[j])
            state = self._best[(min(parent, j), max(parent, j))]
            hop = Hop(self._nodes[parent], self._nodes[j], state.link.id, state.link.kind,
                      state.cost)
            into[j] = hop
            first[j] = first.get(parent, hop)
            paths[j] = (*paths[parent], self._nodes[j])

    def _tree(self, src: int) -> tuple[NDArray[np.float64], NDArray[np.int32]]:
        """Distances and predecessors from ``src`` (caller holds the lock)."""
        tree = self._trees.get(src)
        if tree is None:
            dist, pred = dijkstra(self._graph, directed=False, indices=src,
                                  return_predecessors=True)
            tree = (dist, pred)
            self._trees[src] = tree
        return tree

    def _node_index(self, node: str) -> int:
        try:
            return self._index[NodeId(node)]
        except KeyError:
            if self._learning:
                raise learning_error(f"KMSTN {node!r}") from None
            raise unknown_node_error(node) from None

    def _no_route(self, src: int, dst: int) -> KmstnError:
        return no_route_error(self._nodes[src], self._nodes[dst], self._cut(src))

    def _cut(self, src: int) -> tuple[str, ...]:
        """The down links that leave the part of the graph src reaches, sorted."""
        _, labels = connected_components(self._graph, directed=False)
        reach = labels[src]
        return tuple(sorted(
            s.link.id
            for s in self._links.values()
            if not s.up
            and (labels[self._index[s.link.a]] == reach) != (labels[self._index[s.link.b]] == reach)
        ))

