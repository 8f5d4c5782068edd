"""Link state at scale: a thousand nodes of kmstn's own link-state code, one process.

    python -m routing.simulate [--nodes 1000] [--graph ba|rgg|both] [--changes 5] [--seed 1]

Every simulated node runs exactly what a routing process runs: a
:class:`routing.engine.LinkStateEngine` over its own
:class:`routing.lsdb.Database` and :class:`routing.origin.Originator`, with
its own ML-DSA-65 key and link-state certificate (issued by one ML-DSA-65 CA
made here), verifying every record it receives. Only the transport is
simulated: an event queue in simulated time carries each send from one
engine to the next.

The model of time: a message takes its link's latency (random geometric
graph: 0.5 ms + 10 ms per unit of distance in the unit square; Barabasi-
Albert: uniform 1-10 ms); a node handles its messages one at a time, each
taking the CPU time the engine actually took here (this thread's, so other
processes on the machine do not count), plus the ML-DSA-65
verifications the shared verification cache spared it (each node verifies
every new record it receives; in this one process the bytes are verified
once and the others reuse the result, so their cost, measured here, is added
to their simulated time instead of spent again).

Start: every node holds every record (the network converged). One change:
a random link fails (both ends see it at the same simulated instant, as when
its device stops answering), later it comes back. Printed per change:
simulated time until the last node holds both new records (convergence),
link-state messages sent per link of the graph, and whether every node's
database agrees afterwards (equal digests on every link, so no sync is due)
and no sampled node routes over the failed link. Detection time is not
included: a device that stops answering is seen at the next poll
(``device_poll_ms``), a silent neighbour after ``dead_interval_ms``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import heapq
import itertools
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import NameOID

from kme.config import LinkStateSettings, Topology
from kme.types import NodeId
from routing.engine import LinkStateEngine, Sends
from routing.graph import RoutingTable
from routing.lsdb import Database, learned_graph
from routing.origin import LocalLink, Originator
from routing.records import CertificateTrust, Signed, Signer, Verifier

__all__ = ["Graph", "Simulation", "barabasi_albert", "main", "random_geometric"]

EPOCH_MS = 1_800_000_000_000  # simulated wall clock at the start
FEDERATION = "simulated"


@dataclass
class Graph:
    name: str
    n: int
    edges: list[tuple[int, int]]
    latency_ms: dict[tuple[int, int], float]


def barabasi_albert(n: int, m: int, rng: random.Random) -> Graph:
    """Preferential attachment: each new node links to m existing ones, by degree."""
    edges: set[tuple[int, int]] = set()
    targets = list(range(m))
    repeated: list[int] = []
    for v in range(m, n):
        for t in set(targets):
            edges.add((min(v, t), max(v, t)))
        repeated += targets
        repeated += [v] * m
        targets = []
        while len(set(targets)) < m:
            targets.append(rng.choice(repeated))
        targets = list(set(targets))
    lat = {e: rng.uniform(1.0, 10.0) for e in edges}
    return Graph(f"Barabasi-Albert n={n} m={m}", n, sorted(edges), lat)


def random_geometric(n: int, degree: float, rng: random.Random) -> Graph:
    """Nodes in the unit square joined within a radius giving ``degree`` on average;
    the largest part is kept connected by joining each other part to its nearest node."""
    pts = [(rng.random(), rng.random()) for _ in range(n)]
    radius = math.sqrt(degree / (math.pi * n))
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(pts):
        cells.setdefault((int(x / radius), int(y / radius)), []).append(i)
    edges: set[tuple[int, int]] = set()
    for (cx, cy), members in cells.items():
        for dx, dy in itertools.product((-1, 0, 1), repeat=2):
            for j in cells.get((cx + dx, cy + dy), ()):
                for i in members:
                    if i < j and math.dist(pts[i], pts[j]) <= radius:
                        edges.add((i, j))
    # Join the parts: each part to the nearest node outside it, until one remains.
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        parent[find(a)] = find(b)
    roots = {find(i) for i in range(n)}
    while len(roots) > 1:
        part = [i for i in range(n) if find(i) == next(iter(roots))]
        inside = set(part)
        a, b = min(((i, j) for i in part for j in range(n) if j not in inside),
                   key=lambda e: math.dist(pts[e[0]], pts[e[1]]))
        edges.add((min(a, b), max(a, b)))
        parent[find(a)] = find(b)
        roots = {find(i) for i in range(n)}
    lat = {(i, j): 0.5 + 10.0 * math.dist(pts[i], pts[j]) for i, j in edges}
    return Graph(f"random geometric n={n} degree~{degree:g}", n, sorted(edges), lat)


def _node(i: int) -> NodeId:
    return NodeId(f"N{i:04d}")


class _Ca:
    """An ML-DSA-65 link-state CA in memory, issuing one certificate per simulated node."""

    def __init__(self) -> None:
        self.key = mldsa.MLDSA65PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "simulated link-state CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(1)
                     .not_valid_before(now - dt.timedelta(days=1))
                     .not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
                     .sign(self.key, None))

    def signer(self, node: NodeId, serial: int) -> Signer:
        key = mldsa.MLDSA65PrivateKey.generate()
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(serial + 2).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                .sign(self.key, None))
        return Signer(key, cert)


SETTINGS = LinkStateSettings(key=Path("-"), cert=Path("-"), ca=Path("-"), up_hold_s=0.0,
                             min_cost_interval_s=0.0)


@dataclass
class _Sim:
    engine: LinkStateEngine
    busy_until: float = 0.0
    seen: set[bytes] = field(default_factory=set)
    installed_at: dict[bytes, float] = field(default_factory=dict)


@dataclass
class ChangeResult:
    what: str
    converged_ms: float
    messages: int
    records: int
    per_link: float
    consistent: bool
    routes_ok: bool


class Simulation:
    def __init__(self, graph: Graph, rng: random.Random, qkd_share: float = 0.3) -> None:
        self.graph = graph
        self.rng = rng
        self.now = 0.0
        self._queue: list[tuple[float, int, NodeId, NodeId, list[Signed]]] = []
        self._tick = itertools.count()
        ca = _Ca()
        verifier = Verifier(CertificateTrust(ca.cert), FEDERATION, cache_size=4 * graph.n)
        self.verifier = verifier
        self.kind = {e: ("qkd" if rng.random() < qkd_share else "pqc") for e in graph.edges}
        self.lat: dict[frozenset[NodeId], float] = {}
        links: dict[int, list[LocalLink]] = {i: [] for i in range(graph.n)}
        for (a, b) in graph.edges:
            lid = f"L{a}-{b}"
            kind = self.kind[(a, b)]
            for x, y in ((a, b), (b, a)):
                links[x].append(LocalLink(lid, _node(y), kind, 1.0,  # type: ignore[arg-type]
                                          nominal_rate_bps=1000.0 if kind == "qkd" else 0.0))
            self.lat[frozenset((_node(a), _node(b)))] = graph.latency_ms[(a, b)]
        self.neighbours = {_node(i): {link.neighbour for link in links[i]}
                           for i in range(graph.n)}
        self.nodes: dict[NodeId, _Sim] = {}
        for i in range(graph.n):
            me = _node(i)
            db = Database(me, verifier, now_ms=self._now_ms)
            origin = Originator(me, FEDERATION, (), tuple(links[i]), SETTINGS)
            self.nodes[me] = _Sim(LinkStateEngine(db, origin, ca.signer(me, i),
                                                  now_ms=self._now_ms))
        self._state = {n: dict.fromkeys(self.neighbours[n], True) for n in self.nodes}
        self._measure_crypto()

    def _now_ms(self) -> int:
        return EPOCH_MS + int(self.now)

    def _measure_crypto(self) -> None:
        """The real cost of one ML-DSA-65 verification here (median of 50)."""
        some = next(iter(self.nodes.values())).engine
        some.report(self._state[some.me], {})
        signed = some.db.get(some.me)
        assert signed is not None  # noqa: S101 - just signed
        key = self.verifier._trust.key_for(signed.verified.signed.certificate)[1]
        times = []
        for _ in range(50):
            t = time.perf_counter()
            key.verify(signed.verified.signed.signature, signed.verified.signed.record,
                       b"kmstn/linkstate/v1")
            times.append((time.perf_counter() - t) * 1000)
        self.verify_ms = statistics.median(times)

    def converge_from_scratch(self) -> None:
        """Every node signs its record and holds everyone's (the network converged)."""
        full = Database(NodeId("-"), self.verifier, now_ms=self._now_ms)
        for n, sim in self.nodes.items():
            sim.engine.report(self._state[n], {})
            entry = sim.engine.db.get(n)
            assert entry is not None  # noqa: S101 - just signed
            full.install(entry.verified.signed, None)
        for sim in self.nodes.values():
            sim.engine.db.start_from(full)
            sim.seen = {e.verified.signed.digest for e in full.entries().values()}
        # A thousand databases are a large heap: keep the collector from scanning
        # it in the middle of one node's turn (a pause no single node would have).
        gc.collect()
        gc.freeze()

    # -- the event loop ----------------------------------------------------------

    def _send(self, src: NodeId, sends: Sends, at: float) -> int:
        count = 0
        for dst, records in sends.by_node.items():
            if records:
                lat = self.lat[frozenset((src, dst))]
                heapq.heappush(self._queue, (at + lat, next(self._tick), dst, src, records))
                count += 1
        return count

    def run(self) -> tuple[int, int]:
        """Deliver until quiet; messages and records sent."""
        messages = records = 0
        while self._queue:
            arrival, _, dst, src, batch = heapq.heappop(self._queue)
            sim = self.nodes[dst]
            self.now = max(arrival, sim.busy_until)
            t = time.thread_time()
            sends = sim.engine.submit(src, batch)
            spent = (time.thread_time() - t) * 1000
            fresh = [s for s in batch if s.digest not in sim.seen]
            sim.seen.update(s.digest for s in fresh)
            done = self.now + spent + self.verify_ms * len(fresh)
            sim.busy_until = done
            for s in fresh:
                sim.installed_at.setdefault(s.digest, done)
            messages += self._send(dst, sends, done)
            records += sum(len(v) for v in sends.by_node.values())
        return messages, records

    def change(self, a: NodeId, b: NodeId, up: bool) -> ChangeResult:
        """Link a-b goes down (or comes back) at both ends at once; run to quiet."""
        start = self.now = max(s.busy_until for s in self.nodes.values())
        messages = records = 0
        new: list[bytes] = []
        for me, other in ((a, b), (b, a)):
            self._state[me][other] = up
            sim = self.nodes[me]
            self.now = max(start, sim.busy_until)
            t = time.thread_time()
            sends = sim.engine.report(self._state[me], {})
            done = self.now + (time.thread_time() - t) * 1000
            sim.busy_until = done
            entry = sim.engine.db.get(me)
            assert entry is not None  # noqa: S101 - just signed
            new.append(entry.verified.signed.digest)
            sim.seen.add(new[-1])
            sim.installed_at[new[-1]] = done
            messages += self._send(me, sends, done)
            records += sum(len(v) for v in sends.by_node.values())
        m, r = self.run()
        messages += m
        records += r
        last = max(sim.installed_at.get(d, math.inf) for sim in self.nodes.values() for d in new)
        digests = {n: s.engine.digest for n, s in self.nodes.items()}
        consistent = all(digests[u] == digests[v] for u in self.nodes for v in self.neighbours[u])
        return ChangeResult("up" if up else "down", last - start, messages, records,
                            messages / len(self.graph.edges), consistent,
                            self._routes_ok(a, b, up))

    def _routes_ok(self, a: NodeId, b: NodeId, up: bool, sample: int = 20) -> bool:
        """Sampled nodes route over link a-b only when it is up."""
        lid = next(link.link_id for link in self.nodes[a].engine.originator.links
                   if link.neighbour == b)
        for n in self.rng.sample(sorted(self.nodes), min(sample, len(self.nodes))):
            table = RoutingTable(Topology(Path("-"), FEDERATION, 256, {}, (), {}), n)
            table.learn(*learned_graph(self.nodes[n].engine.db))
            state = {s.link.id: s.up for s in table.links()[1]}
            if state.get(lid, False) != up:
                return False
            used = {h.link_id for e in table.forwarding_table().entries.values()
                    if e.last_hop is not None for h in (e.last_hop,)}
            if not up and lid in used:
                return False
        return True


def simulate(graph: Graph, changes: int, rng: random.Random) -> list[ChangeResult]:
    t = time.perf_counter()
    sim = Simulation(graph, rng)
    sim.converge_from_scratch()
    print(f"\n{graph.name}: {len(graph.edges)} links, "
          f"{sum(1 for k in sim.kind.values() if k == 'qkd')} QKD; set up in "
          f"{time.perf_counter() - t:.1f} s (keys, certificates, {graph.n} signed records); "
          f"ML-DSA-65 verify {sim.verify_ms:.3f} ms (measured here)", flush=True)
    out = []
    for _ in range(changes):
        u, v = rng.choice(graph.edges)
        for up in (False, True):
            t = time.perf_counter()
            r = sim.change(_node(u), _node(v), up)
            out.append(r)
            print(f"  link N{u:04d}-N{v:04d} {r.what:<4}  converged in {r.converged_ms:7.1f} ms"
                  f" simulated  {r.messages:5d} messages ({r.per_link:.2f} per link, "
                  f"{r.records} records)  databases agree: {'yes' if r.consistent else 'NO'}  "
                  f"routes: {'ok' if r.routes_ok else 'WRONG'}  "
                  f"({time.perf_counter() - t:.1f} s wall)", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--graph", choices=("ba", "rgg", "both"), default="both")
    p.add_argument("--changes", type=int, default=5, help="random links failed (and restored)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)  # noqa: S311 - graphs and latencies, not secrets
    graphs = []
    if args.graph in ("ba", "both"):
        graphs.append(barabasi_albert(args.nodes, 2, rng))
    if args.graph in ("rgg", "both"):
        graphs.append(random_geometric(args.nodes, 6.0, rng))
    results = [(g, simulate(g, args.changes, rng)) for g in graphs]
    print("\nsummary (median / worst over the changes; targets: <= 1000 ms, <= 2 per link)")
    ok = True
    for g, rs in results:
        conv = [r.converged_ms for r in rs]
        per = [r.per_link for r in rs]
        good = all(r.consistent and r.routes_ok for r in rs)
        ok = ok and good and max(conv) <= 1000 and max(per) <= 2
        print(f"  {g.name:<40} convergence {statistics.median(conv):7.1f} / {max(conv):7.1f}"
              f" ms simulated; messages per link {statistics.median(per):.2f} / {max(per):.2f};"
              f" consistent and routed right: {'yes' if good else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
