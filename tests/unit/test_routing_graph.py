"""Routing: optimality against networkx on random graphs, run-time link state, and the
forwarding table that subscribers answer from (the same answers as the graph)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kme.config import Kmstn, Link, QkdLink, Topology, load_topology
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import common_pb2, routing_pb2
from kme.types import NodeId, SaeId
from routing.convert import table_from_proto, table_to_proto
from routing.graph import RoutingTable
from routing.table import ForwardingTable, Route
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


def test_while_learning_an_unknown_sae_or_node_is_not_known_yet(testbed: RoutingTable) -> None:
    """A routing service just started with link state has not heard its neighbours yet:
    an SAE or node it lacks may exist, so the answer is UNAVAILABLE with Retry-After
    (ETSI 014: 503), from the graph and from the table a subscriber follows; once it has
    learned, the same question is UNKNOWN_SAE / UNKNOWN_NODE again."""
    v0 = testbed.version
    testbed.set_learning(True)
    assert testbed.version == v0 + 1
    followed = over_the_wire(testbed)
    assert followed.learning
    for ask in (lambda: testbed.route_to_sae("nobody"), lambda: followed.route_to_sae("nobody"),
                lambda: testbed.route_to_node("KMSTN99"),
                lambda: followed.route_to_node("KMSTN99")):
        with pytest.raises(KmstnError) as err:
            ask()
        assert err.value.code is ErrorCode.UNAVAILABLE
        assert err.value.retry_after_s == 1
        assert "not known yet" in err.value.public
    # What it knows it answers as ever.
    assert followed.route_to_sae("SAE8").path[-1] == "KMSTN8"
    testbed.set_learning(False)
    assert testbed.version == v0 + 2
    followed = over_the_wire(testbed)
    assert not followed.learning
    with pytest.raises(KmstnError) as err:
        followed.route_to_sae("nobody")
    assert err.value.code is ErrorCode.UNKNOWN_SAE
    with pytest.raises(KmstnError) as err:
        testbed.route_to_node("KMSTN99")
    assert err.value.code is ErrorCode.UNKNOWN_NODE


# -- the forwarding table ------------------------------------------------------


def over_the_wire(table: RoutingTable) -> ForwardingTable:
    """The forwarding table as a subscriber gets it: built, serialized, parsed."""
    wire = table_to_proto(table.forwarding_table()).SerializeToString()
    return table_from_proto(routing_pb2.ForwardingTable.FromString(wire))


def answer(ask: Callable[[], object]) -> object:
    """A route, or the error as everything a caller can see of it."""
    try:
        return ask()
    except KmstnError as exc:
        return (exc.code, exc.public, exc.cause, exc.reason)


@settings(max_examples=300, deadline=None)
@given(graphs(), st.data())
def test_forwarding_table_answers_as_the_graph(
        graph: tuple[int, list[tuple[int, int, float, str]], list[bool]],
        data: st.DataObject) -> None:
    """For every destination, the table gives the graph's very Route (next hop, kind,
    link, cost, path, every hop, version) or its very error, and agrees with networkx."""
    n, edges, up = graph
    topo = make_topology(n, edges)
    me = NodeId(f"N{data.draw(st.integers(0, n - 1))}")
    graph_table = RoutingTable(topo, me)
    for k, is_up in enumerate(up):
        if not is_up:
            graph_table.set_link_state(f"L{k}", False)
    table = over_the_wire(graph_table)
    assert table.version == graph_table.version and table.self_node == me
    lengths = nx.single_source_dijkstra_path_length(oracle(n, edges, up), me)
    for dest in [*(f"N{i}" for i in range(n)), "N-none"]:
        expected = answer(partial(graph_table.route_to_node, dest))
        got = answer(partial(table.route_to_node, dest))
        assert got == expected
        if isinstance(got, Route):
            assert math.isclose(got.total_cost, lengths[dest], rel_tol=1e-9, abs_tol=1e-9)
            entry = table.entry(dest)
            assert (entry.next_hop, entry.next_link_id, entry.next_kind) == (
                got.next_hop, got.link_id, got.next_kind)
        else:
            assert dest not in lengths
            assert isinstance(got, tuple)
            assert got[0] is (ErrorCode.UNKNOWN_NODE if dest == "N-none" else ErrorCode.NO_ROUTE)
    for sae in [*topo.saes, "nobody"]:
        assert answer(partial(table.route_to_sae, sae)) == answer(
            partial(graph_table.route_to_sae, sae, me))
        assert answer(partial(table.node_of_sae, sae)) == answer(partial(topo.node_of_sae, sae))


def test_forwarding_table_of_the_testbed(testbed: RoutingTable) -> None:
    table = over_the_wire(testbed)
    route = table.route_to_sae("SAE8")
    assert route == testbed.route_to_sae("SAE8")
    assert route.path == tuple(f"KMSTN{i}" for i in range(1, 9))
    assert [h.kind for h in route.hops] == ["qkd", "pqc"] * 3 + ["qkd"]
    assert (route.next_hop, route.next_kind, route.link_id) == ("KMSTN2", "qkd", "QKD-1-2")
    assert table.route_to_sae("SAE1").is_local
    assert table.node_of_sae("SAE8") == "KMSTN8"
    testbed.set_link_state("PQC-4-5", False)
    cut = over_the_wire(testbed)
    assert cut.version == table.version + 1
    with pytest.raises(KmstnError) as err:
        cut.route_to_sae("SAE8")
    assert err.value.code is ErrorCode.NO_ROUTE
    assert err.value.public == "no path from KMSTN1 to KMSTN8: cut by links down: PQC-4-5"
    assert cut.route_to_sae("SAE4").path[-1] == "KMSTN4"
    assert cut.entry("KMSTN8").cut == ("PQC-4-5",)
    # The table answered before the change still answers for its own version.
    assert table.route_to_sae("SAE8") == route


def test_forwarding_table_is_built_once_per_version(testbed: RoutingTable) -> None:
    first = testbed.forwarding_table()
    assert testbed.forwarding_table() is first
    testbed.set_link_state("QKD-1-2", True)  # no change: same version, same table
    assert testbed.forwarding_table() is first
    testbed.set_link_state("QKD-1-2", False)
    assert testbed.forwarding_table().version == first.version + 1


def _mangle(table: RoutingTable, change: Callable[[routing_pb2.ForwardingTable], None]
            ) -> routing_pb2.ForwardingTable:
    msg = table_to_proto(table.forwarding_table())
    change(msg)
    return msg


def _entry(msg: routing_pb2.ForwardingTable, node: str) -> routing_pb2.ForwardingTable.Entry:
    return next(e for e in msg.entries if e.destination_node_id == node)


@pytest.mark.parametrize("change", [
    # A path that skips a node: no longer its parent's path plus one hop.
    lambda m: _entry(m, "KMSTN4").path.remove("KMSTN3"),
    # A last hop that does not enter the destination.
    lambda m: setattr(_entry(m, "KMSTN3").last_hop, "to_node_id", "KMSTN9"),
    # A next hop that is not the path's first hop.
    lambda m: setattr(_entry(m, "KMSTN5"), "next_hop_node_id", "KMSTN8"),
    lambda m: setattr(_entry(m, "KMSTN5"), "next_hop_kind", common_pb2.LINK_KIND_PQC),
    # A path that does not start here.
    lambda m: setattr(m, "self_node_id", "KMSTN2"),
    # A link kind this version does not know.
    lambda m: setattr(_entry(m, "KMSTN2").last_hop, "kind", 99),
], ids=["skipped-node", "last-hop", "next-hop", "next-kind", "source", "kind"])
def test_a_table_that_is_not_one_tree_is_refused(
        testbed: RoutingTable, change: Callable[[routing_pb2.ForwardingTable], None]) -> None:
    table_from_proto(_mangle(testbed, lambda m: None))  # the unmangled table is fine
    with pytest.raises(ValueError, match="table 1"):
        table_from_proto(_mangle(testbed, change))
