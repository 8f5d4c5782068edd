"""Routing: optimality against networkx on random graphs, and run-time link state."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kme.config import Kmstn, Link, QkdLink, Topology, load_topology
from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId
from routing.graph import RoutingTable
from tests.helpers import REPO

KINDS = ("qkd", "pqc")


def make_topology(n: int, edges: list[tuple[int, int, float, str]]) -> Topology:
    nodes = {NodeId(f"N{i}"): Kmstn(NodeId(f"N{i}"), "127.0.0.1", 1, 2, 3, "kmstn")
             for i in range(n)}
    links: list[Link] = []
    for k, (a, b, cost, kind) in enumerate(edges):
        cls = QkdLink if kind == "qkd" else Link
        links.append(cls(id=f"L{k}", kind=kind, a=NodeId(f"N{a}"), b=NodeId(f"N{b}"),
                         cost=cost))  # type: ignore[arg-type]
    saes = {SaeId(f"S{i}"): NodeId(f"N{i}") for i in range(n)}
    return Topology(Path("/mem"), "random", 256, nodes, tuple(links), saes)


@st.composite
def graphs(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, float, str]], list[bool]]:
    n = draw(st.integers(2, 14))
    pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1])
    edge = st.tuples(pairs, st.floats(0.01, 100.0, allow_nan=False), st.sampled_from(KINDS))
    raw = draw(st.lists(edge, max_size=3 * n))
    edges = [(a, b, cost, kind) for (a, b), cost, kind in raw]
    up = draw(st.lists(st.booleans(), min_size=len(edges), max_size=len(edges)))
    return n, edges, up


def oracle(n: int, edges: list[tuple[int, int, float, str]], up: list[bool]) -> nx.Graph:
    g = nx.Graph()
    g.add_nodes_from(f"N{i}" for i in range(n))
    for (a, b, cost, _), is_up in zip(edges, up, strict=True):
        if not is_up:
            continue
        u, v = f"N{a}", f"N{b}"
        if not g.has_edge(u, v) or g[u][v]["weight"] > cost:
            g.add_edge(u, v, weight=cost)
    return g


@settings(max_examples=300, deadline=None)
@given(graphs(), st.data())
def test_routes_are_shortest_and_valid(graph: tuple[int, list[tuple[int, int, float, str]],
                                                    list[bool]], data: st.DataObject) -> None:
    n, edges, up = graph
    topo = make_topology(n, edges)
    table = RoutingTable(topo, NodeId("N0"))
    for k, is_up in enumerate(up):
        if not is_up:
            table.set_link_state(f"L{k}", False)
    g = oracle(n, edges, up)
    source = data.draw(st.integers(0, n - 1))
    lengths = nx.single_source_dijkstra_path_length(g, f"N{source}")
    for dest in range(n):
        name = f"N{dest}"
        if name not in lengths:
            with pytest.raises(KmstnError) as err:
                table.route_to_node(name, f"N{source}")
            assert err.value.code is ErrorCode.NO_ROUTE
            continue
        route = table.route_to_node(name, f"N{source}")
        assert math.isclose(route.total_cost, lengths[name], rel_tol=1e-9, abs_tol=1e-9)
        assert route.path[0] == f"N{source}" and route.path[-1] == name
        # Every hop uses a link that is up, joins the two nodes, and costs what it says.
        total = 0.0
        for hop, (u, v) in zip(route.hops, itertools.pairwise(route.path),
                               strict=True):
            link = topo.link(hop.link_id)
            assert {link.a, link.b} == {u, v} == {hop.from_node, hop.to_node}
            assert up[int(hop.link_id[1:])]
            assert hop.kind == link.kind
            total += hop.cost
        assert math.isclose(total, route.total_cost, rel_tol=1e-9, abs_tol=1e-9)


@pytest.fixture
def testbed() -> RoutingTable:
    return RoutingTable(load_topology(REPO / "examples" / "testbed.toml"), NodeId("KMSTN1"))


def test_longest_path_of_the_testbed(testbed: RoutingTable) -> None:
    route = testbed.route_to_sae("SAE8")
    assert route.path == tuple(f"KMSTN{i}" for i in range(1, 9))
    assert [h.kind for h in route.hops] == ["qkd", "pqc"] * 3 + ["qkd"]
    assert route.next_hop == "KMSTN2" and route.next_kind == "qkd"


def test_local_sae_needs_no_hop(testbed: RoutingTable) -> None:
    route = testbed.route_to_sae("SAE1")
    assert route.is_local and route.path == ("KMSTN1",) and route.next_hop is None


def test_link_down_reroutes_and_up_restores() -> None:
    # A square: N0-N1-N2 is cheap, N0-N3-N2 is the detour.
    topo = make_topology(4, [(0, 1, 1.0, "qkd"), (1, 2, 1.0, "pqc"),
                             (0, 3, 5.0, "pqc"), (3, 2, 5.0, "pqc")])
    table = RoutingTable(topo, NodeId("N0"))
    v1 = table.route_to_node("N2")
    assert v1.path == ("N0", "N1", "N2")
    table.set_link_state("L1", False)
    v2 = table.route_to_node("N2")
    assert v2.path == ("N0", "N3", "N2") and v2.total_cost == 10.0
    assert v2.version > v1.version
    table.set_link_state("L1", True)
    assert table.route_to_node("N2").path == ("N0", "N1", "N2")
    # A cost change reroutes too.
    table.set_link_state("L0", True, cost=50.0)
    assert table.route_to_node("N2").path == ("N0", "N3", "N2")


def test_parallel_links_prefer_the_cheapest_up_one() -> None:
    topo = make_topology(2, [(0, 1, 1.0, "qkd"), (0, 1, 3.0, "pqc")])
    table = RoutingTable(topo, NodeId("N0"))
    assert table.route_to_node("N1").hops[0].kind == "qkd"
    table.set_link_state("L0", False)  # the QKD device fails: fall back to PQC
    hop = table.route_to_node("N1").hops[0]
    assert (hop.kind, hop.cost) == ("pqc", 3.0)


def test_no_route_names_the_cut(testbed: RoutingTable) -> None:
    testbed.set_link_state("PQC-4-5", False)
    with pytest.raises(KmstnError) as err:
        testbed.route_to_sae("SAE8")
    assert err.value.code is ErrorCode.NO_ROUTE
    assert err.value.public == "no path from KMSTN1 to KMSTN8: cut by links down: PQC-4-5"
    assert testbed.route_to_sae("SAE4").path[-1] == "KMSTN4"


def test_unknown_sae_and_link(testbed: RoutingTable) -> None:
    with pytest.raises(KmstnError) as err:
        testbed.route_to_sae("nobody")
    assert err.value.code is ErrorCode.UNKNOWN_SAE
    assert "nobody" in err.value.public
    with pytest.raises(KmstnError) as err:
        testbed.set_link_state("no-such-link", False)
    assert err.value.code is ErrorCode.UNKNOWN_NODE
    with pytest.raises(KmstnError) as err:
        testbed.set_link_state("QKD-1-2", True, cost=0)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
