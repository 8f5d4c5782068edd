"""Benchmark: route computation on random topologies of 1,000 and 10,000 KMSTNs.

    python -m routing.bench [--sizes 1000 10000] [--runs 15] [--seed 1]

For each size it builds a random connected topology (a random spanning tree
plus random extra links, average degree about 4, a third of the links QKD)
and prints medians over ``--runs`` runs of:

- ``cold route``: a Route from a source not seen before, which runs Dijkstra
  with predecessors from that one source and walks the path back;
- ``warm route``: the same question again (the per-source tree is cached);
- ``link change``: a link goes down (graph rebuilt, caches dropped).

and what a link change costs with forwarding tables (once per change, off
the hot path; the routing service builds and serializes the table once and
sends the same bytes to every subscriber):

- ``table``: the forwarding table of one node after the change (Dijkstra
  from that node, then one entry per destination);
- ``serialize``: that table as a ``ForwardingTable`` message, to bytes
  (``KB`` is its size);
- ``parse``: what each subscriber does on receipt: bytes to message to the
  checked domain table;
- ``lookup``: a route from a follower's table, first time (built from the
  entries) and again (kept).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from kme.config import Kmstn, Link, QkdLink, Topology
from kme.rpc.v1 import routing_pb2
from kme.types import NodeId, SaeId
from routing.convert import table_from_proto, table_to_proto
from routing.graph import RoutingTable


def random_topology(n: int, rng: random.Random, degree: float = 4.0) -> Topology:
    nodes = {NodeId(f"K{i}"): Kmstn(NodeId(f"K{i}"), "127.0.0.1", 1, 2, 3, "kmstn")
             for i in range(n)}
    pairs: set[tuple[int, int]] = set()
    for i in range(1, n):  # a random spanning tree keeps the graph connected
        pairs.add((rng.randrange(i), i))
    while len(pairs) < int(n * degree / 2):
        a, b = rng.randrange(n), rng.randrange(n)
        if a != b:
            pairs.add((min(a, b), max(a, b)))
    links: list[Link] = []
    for k, (a, b) in enumerate(sorted(pairs)):
        if rng.random() < 1 / 3:
            links.append(QkdLink(id=f"L{k}", kind="qkd", a=NodeId(f"K{a}"), b=NodeId(f"K{b}"),
                                 cost=rng.uniform(0.5, 2.0)))
        else:
            links.append(Link(id=f"L{k}", kind="pqc", a=NodeId(f"K{a}"), b=NodeId(f"K{b}"),
                              cost=rng.uniform(1.0, 4.0)))
    saes = {SaeId(f"S{i}"): NodeId(f"K{i}") for i in range(n)}
    return Topology(Path("<random>"), f"random-{n}", 256, nodes, tuple(links), saes)


def bench(n: int, runs: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)  # noqa: S311 - a reproducible benchmark, not a secret
    topo = random_topology(n, rng)
    t0 = time.perf_counter()
    table = RoutingTable(topo)
    build = time.perf_counter() - t0
    sources = rng.sample(range(n), runs)
    cold, warm, change, hops = [], [], [], []
    for src in sources:
        dst = rng.randrange(n)
        t0 = time.perf_counter()
        route = table.route_to_node(f"K{dst}", f"K{src}")
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        table.route_to_node(f"K{dst}", f"K{src}")
        warm.append(time.perf_counter() - t0)
        hops.append(len(route.hops))
    for _ in range(runs):
        link = rng.choice(topo.links).id
        t0 = time.perf_counter()
        table.set_link_state(link, False)
        change.append(time.perf_counter() - t0)
        table.set_link_state(link, True)
    return {
        "nodes": n,
        "links": len(topo.links),
        "build_ms": build * 1e3,
        "cold_route_ms": statistics.median(cold) * 1e3,
        "warm_route_us": statistics.median(warm) * 1e6,
        "link_change_ms": statistics.median(change) * 1e3,
        "median_hops": statistics.median(hops),
        **bench_table(topo, runs, rng),
    }


def bench_table(topo: Topology, runs: int, rng: random.Random) -> dict[str, float]:
    nodes = list(topo.kmstns)
    table_s, ser_s, parse_s, first_s, again_s, size = [], [], [], [], [], []
    for _ in range(runs):
        graph = RoutingTable(topo, rng.choice(nodes))
        graph.forwarding_table()
        link = rng.choice(topo.links).id
        graph.set_link_state(link, False)
        t0 = time.perf_counter()
        table = graph.forwarding_table()
        table_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        wire = table_to_proto(table).SerializeToString()
        ser_s.append(time.perf_counter() - t0)
        size.append(len(wire))
        t0 = time.perf_counter()
        followed = table_from_proto(routing_pb2.ForwardingTable.FromString(wire))
        parse_s.append(time.perf_counter() - t0)
        dest = rng.choice([n for n, e in followed.entries.items() if e.reachable])
        t0 = time.perf_counter()
        followed.route_to_node(dest)
        first_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        followed.route_to_node(dest)
        again_s.append(time.perf_counter() - t0)
    return {
        "table_ms": statistics.median(table_s) * 1e3,
        "serialize_ms": statistics.median(ser_s) * 1e3,
        "table_kb": statistics.median(size) / 1024,
        "parse_ms": statistics.median(parse_s) * 1e3,
        "lookup_first_us": statistics.median(first_s) * 1e6,
        "lookup_again_us": statistics.median(again_s) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    results = [bench(n, args.runs, args.seed) for n in args.sizes]
    print(f"{'nodes':>7} {'links':>7} {'build ms':>9} {'cold route ms':>14} "
          f"{'warm route us':>14} {'link change ms':>15} {'hops':>5}")
    for r in results:
        print(f"{r['nodes']:>7} {r['links']:>7} {r['build_ms']:>9.2f} {r['cold_route_ms']:>14.3f} "
              f"{r['warm_route_us']:>14.1f} {r['link_change_ms']:>15.2f} {r['median_hops']:>5}")
    print(f"(medians of {args.runs} runs; cold = Dijkstra from one new source + path walk)")
    print()
    print("forwarding table after a link change (once per change, in the routing service;")
    print("parse once per change in each subscriber; lookups on the hot path):")
    print(f"{'nodes':>7} {'table ms':>9} {'serialize ms':>13} {'KB':>8} {'parse ms':>9} "
          f"{'lookup first us':>16} {'lookup again us':>16}")
    for r in results:
        print(f"{r['nodes']:>7} {r['table_ms']:>9.2f} {r['serialize_ms']:>13.2f} "
              f"{r['table_kb']:>8.1f} {r['parse_ms']:>9.2f} {r['lookup_first_us']:>16.1f} "
              f"{r['lookup_again_us']:>16.2f}")
    print(f"(medians of {args.runs} runs)")


if __name__ == "__main__":
    main()
