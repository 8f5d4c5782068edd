"""``kmstn bench``: measure a running federation the way the paper did (section VI).

    kmstn bench keyrate     --state DIR [--pairs SAE1:SAE8,...] [--requests 100]
    kmstn bench delay       --state DIR [--pairs ...] [--requests 100]
    kmstn bench concurrency --state DIR [--pairs SAE1:SAE2] [--requests 100] [--rounds 5]
    kmstn bench resources   --state DIR [--requests 30]
    kmstn bench scarcity    --state DIR [--pairs SAE1:SAE2] [--requests 100] [--rounds 5]
    kmstn bench fairness    --state DIR [--pairs SAE1a:SAE2,SAE1b:SAE2,SAE1c:SAE2] [--seconds 60]
    kmstn bench all         --state DIR

Every command prints a table and writes ``<name>.csv`` and ``<name>.json``
(with the raw samples) under ``--out`` (default ``DIR/bench``), and the PNG
figures of the paper it reproduces (lab/plots.py). All SAE traffic is real ETSI 014
over mutual TLS with keep-alive, through the federation's own gateways.

keyrate (Table III): per ordered pair, back-to-back ``enc_keys`` of one
256-bit key; a 503 (too little key yet) is retried after 20 ms and counts in
that request's time. Each request's rate is bits / its latency; the table
gives their mean and standard deviation, the overall delivered rate (bits /
wall time), the rate the QKD links' configured rates allow (see
:func:`qkd_cost`), and the rate the key the devices actually generated
during the window allows (their counters; block arrivals are random, so over
a hundred keys the configured mean is a poor yardstick). "ratio" is
delivered / what the generated key allows. Before each pair the emulated
device pools its key is drawn from (the links of :func:`qkd_cost`) are
drained (as the KMSTN at their end), so the figure is the steady-state rate,
not the key that piled up while the federation idled. The relays hold a few QKD hop
keys ahead of use ([relay] qkd_reserve) that draining the devices does not
touch; an unmeasured warm-up of 10 requests, then a second drain, brings
those pools to their steady level before the measured requests.

delay (Table IV): latency of ``enc_keys`` at the master; enc-to-available:
from the start of ``enc_keys`` until the slave's ``dec_keys`` (called as
soon as the master has the key ID, retried on 400) returns the key. Jitter
is the absolute difference of consecutive latencies; "roll std" is the
standard deviation over a sliding window of 4 requests.

concurrency (Fig. 7): ``--requests`` simultaneous enc_keys at one KMSTN
(one connection each), ``--rounds`` times; failures (non-200) and the
latency spread per round.

scarcity (Fig. 7 under scarcity, issue 11): like concurrency, but every
emulated device store is drained before each round, so the requests find
the store empty and wait for key (the nodes' [supply] wait_ms, e.g.
examples/supply-waits.toml). Per round: served, failed, how many the supply
could serve within the wait budget (key the device made in the budget, from
its counters), failures among those, and whether every failure was a 503
with Retry-After (none a 500, none a hang: a client gives up after 60 s).

fairness (issue 11): the master SAEs of ``--pairs`` (default: every SAE of
the first KMSTN that serves several, toward the next KMSTN's first SAE)
compete for one link, each in its own loop of one-key requests that honours
Retry-After, for ``--seconds``: delivered bits per SAE and Jain's index.
Then a second phase as long, in which the last SAE is greedy (six loops of
four-key requests that ignore Retry-After): its quota errors, and the
others' rates and shares of the delivered key against the first phase (the
link makes key in random blocks, so the rate it allows differs between
phases; the share does not).

keyrate ``--seconds N`` runs each pair for N seconds instead of
``--requests``; keys a stock of the pair gained meanwhile (the relay's
``kmstn_stock_keys``) count as delivered, as key spent for the pair, and
keys it lost (made before the window) are taken off.

resources: CPU seconds (user+system, all processes of each service's group)
spent during a delay run, and peak resident memory sampled every 100 ms.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kme.config import Topology, load_node_config, load_topology
from kme.errors import ErrorCode, KmstnError
from kme.qkd import QkdDeviceClient
from kme.types import NodeId
from lab.federation import group_members
from lab.qkdsim.config import sim_health
from lab.saeclient import SaeClient
from routing.graph import RoutingTable

__all__ = ["allowed_rate", "drain_devices", "qkd_cost", "run_bench"]

KEY_BITS = 256
HOP_KEY_BITS = 256


# -- model: what a delivered key costs in QKD key ---------------------------------------


def qkd_cost(topology: Topology, master_node: str, slave_node: str,
             key_bits: int = KEY_BITS, keys_per_message: int = 1) -> dict[str, float]:
    """QKD bits consumed on each QKD link per delivered key bit, for one key request.

    Mirrors kme.flows: the key itself comes from the master node's device (the
    link toward a QKD neighbour slave, else the first hop's link, else the
    node's first QKD link); a slave on that QKD neighbour needs nothing more
    (the device-keys notice is sealed with ML-KEM alone); otherwise every QKD
    hop of the route spends one 256-bit QKD key per message, shared by the
    ``keys_per_message`` keys it carries.
    """
    src, dst = NodeId(master_node), NodeId(slave_node)
    qkd_of = {frozenset((lk.a, lk.b)): lk for lk in topology.qkd_links}
    mine = [lk for lk in topology.qkd_links if src in (lk.a, lk.b)]
    cost: dict[str, float] = {}
    if src == dst:
        source = mine[0] if mine else None
        if source:
            cost[source.id] = 1.0
        return cost
    route = RoutingTable(topology, src).route_to_node(dst)
    direct = qkd_of.get(frozenset((src, dst)))
    if direct is not None and route.hops and route.hops[0].link_id == direct.id:
        cost[direct.id] = 1.0
        return cost
    first = qkd_of.get(frozenset((src, route.hops[0].to_node)))
    source = first or (mine[0] if mine else None)
    if source is not None:
        cost[source.id] = cost.get(source.id, 0.0) + 1.0
    for hop in route.hops:
        if hop.kind == "qkd":
            share = HOP_KEY_BITS / (key_bits * keys_per_message)
            cost[hop.link_id] = cost.get(hop.link_id, 0.0) + share
    return cost


def allowed_rate(topology: Topology, master_node: str, slave_node: str,
                 rate_scale: float = 1.0) -> float:
    """Delivered key bits/s the QKD links on the path allow (inf if none limits)."""
    links = {lk.id: lk for lk in topology.qkd_links}
    limits = [links[lid].secret_key_rate * links[lid].sim.rate_multiplier * rate_scale / c
              for lid, c in qkd_cost(topology, master_node, slave_node).items() if c > 0]
    return min(limits) if limits else float("inf")


# -- helpers ------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _rolling_std(values: Sequence[float], window: int = 4) -> list[float]:
    return [statistics.pstdev(values[i - window:i]) for i in range(window, len(values) + 1)]


@dataclass
class Ctx:
    state: Path
    manifest: dict[str, Any]
    topology: Topology
    out: Path
    args: Any
    rate_scale: float
    # Raw per-request measurements per benchmark, for the JSON and the figures.
    samples: dict[str, Any] = field(default_factory=dict)

    def sae_node(self, sae: str) -> str:
        return str(next(s["kmstn"] for s in self.manifest["saes"] if s["id"] == sae))

    def client(self, sae: str) -> SaeClient:
        return SaeClient.from_manifest(self.manifest, sae)


def _write(ctx: Ctx, name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / f"{name}.json").write_text(json.dumps({"rows": rows, **extra}, indent=2))
    if rows:
        with (ctx.out / f"{name}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if isinstance(r[k], (int, float)) else str(r[k])
                      for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _first_sae(ctx: Ctx, node: str) -> str:
    return str(next(s["id"] for s in ctx.manifest["saes"] if s["kmstn"] == node))


def _pairs(ctx: Ctx, default: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    if ctx.args.pairs:
        pairs = [p.split(":", 1) for p in ctx.args.pairs.split(",")]
        return [(a, b) for a, b in pairs]
    return default()


def _all_pairs(ctx: Ctx) -> list[tuple[str, str]]:
    nodes = [k["id"] for k in ctx.manifest["kmstns"]]
    return [(_first_sae(ctx, a), _first_sae(ctx, b)) for a in nodes for b in nodes if a != b]


def _delay_pairs(ctx: Ctx) -> list[tuple[str, str]]:
    """Each KMSTN as master toward its QKD neighbour (else the next node), plus the ends."""
    nodes = [k["id"] for k in ctx.manifest["kmstns"]]
    pairs = []
    for node in nodes:
        peer = next((lk.other(NodeId(node)) for lk in ctx.topology.qkd_links
                     if node in (lk.a, lk.b)), None)
        peer = peer or nodes[(nodes.index(node) + 1) % len(nodes)]
        pairs.append((_first_sae(ctx, node), _first_sae(ctx, peer)))
    pairs.append((_first_sae(ctx, nodes[0]), _first_sae(ctx, nodes[-1])))
    return pairs


def route_summary(ctx: Ctx, master: str, slave: str) -> tuple[int, str]:
    src, dst = ctx.sae_node(master), ctx.sae_node(slave)
    route = RoutingTable(ctx.topology, NodeId(src)).route_to_node(dst)
    return len(route.hops), "-".join(h.kind for h in route.hops) or "local"


# -- device pools --------------------------------------------------------------------------


DRAIN_S: Final = 2.0


def drain_devices(ctx: Ctx, only: Iterable[str] | None = None) -> int:
    """Empty every emulated device pool (as the KMSTN at end a), so rates start from zero;
    with ``only``, the pools of those QKD link IDs alone (the links a pair's key costs).

    Asks for the most keys a request may take, then halves the number after
    each 503 down to one key, so no remainder smaller than a request is left.
    A device that makes key about as fast as it can be drawn (a high
    ``--qkd-rate-scale``) is drawn for DRAIN_S at most: its pool is then as
    near empty as drawing can make it.
    """
    drained = 0
    wanted = None if only is None else set(only)
    for link in ctx.topology.qkd_links:
        if wanted is not None and link.id not in wanted:
            continue
        cfg = load_node_config(ctx.state / "nodes" / link.a / "node.toml")
        client = QkdDeviceClient(link, link.a, cfg.qkd_devices[link.id])
        number = link.max_key_per_request
        stop = time.monotonic() + DRAIN_S
        try:
            while number >= 1 and time.monotonic() < stop:
                try:
                    drained += len(client.enc_keys(number, link.key_size))
                except KmstnError as exc:
                    if exc.code is ErrorCode.TIMEOUT:
                        break  # too busy making key to answer: as drained as it gets
                    if exc.code is not ErrorCode.INSUFFICIENT_KEY:
                        raise
                    number //= 2
        finally:
            client.close()
    return drained


def generated_bits(ctx: Ctx) -> dict[str, int]:
    """Bits of key each emulated QKD link has generated so far (its health counters)."""
    out = {}
    for link in ctx.topology.qkd_links:
        cfg = load_node_config(ctx.state / "nodes" / link.a / "node.toml")
        doc = sim_health(link.device_of(link.a), cfg.tls.ca, cfg.tls)
        if doc is None or "generated_bits" not in doc:
            raise RuntimeError(f"no counters from the emulator of {link.id}")
        out[link.id] = int(doc["generated_bits"])
    return out


def stock_level(ctx: Ctx, master: str, slave: str) -> int:
    """Keys ready in the master node's stock for this pair (0 without one), from the relay's
    metrics."""
    from lab.dashboard import _fetch

    node = ctx.sae_node(master)
    url = ctx.manifest.get("metrics", {}).get(f"{node}/relay")
    if not url:
        return 0
    scrape = _fetch(url)
    want = f"{master}->{slave}@{ctx.sae_node(slave)}"
    return int(sum(v for _, v in scrape.values("kmstn_stock_keys", stock=want)))


def _request_until_served(client: SaeClient, slave: str, size: int,
                          deadline: float) -> tuple[float, int, Any]:
    """enc_keys, retrying 503 every 20 ms; (latency, retries, body)."""
    t0 = time.perf_counter()
    retries = 0
    while True:
        status, body = client.enc_keys(slave, 1, size)
        if status == 200:
            return time.perf_counter() - t0, retries, body
        if status != 503 or time.monotonic() > deadline:
            raise RuntimeError(f"enc_keys {client.sae_id}->{slave}: {status} {body}")
        retries += 1
        time.sleep(0.02)


# -- benchmarks -----------------------------------------------------------------------------


def bench_keyrate(ctx: Ctx) -> list[dict[str, Any]]:
    rows = []
    for master, slave in _pairs(ctx, lambda: _all_pairs(ctx)):
        client = ctx.client(master)
        deadline = time.monotonic() + 3600
        # Only the pools this pair's key is drawn from bound its rate.
        cost = qkd_cost(ctx.topology, ctx.sae_node(master), ctx.sae_node(slave))
        drain_devices(ctx, cost)
        for _ in range(10):  # warm-up: connections, KEM pools, QKD hop-key pools
            _request_until_served(client, slave, KEY_BITS, deadline)
        drain_devices(ctx, cost)
        gen0 = generated_bits(ctx)
        stock0 = stock_level(ctx, master, slave)
        rates: list[float] = []
        lat: list[float] = []
        start = time.perf_counter()
        seconds = getattr(ctx.args, "seconds", 0) or 0
        while (time.perf_counter() - start < seconds if seconds
               else len(rates) < ctx.args.requests):
            latency, _, _ = _request_until_served(client, slave, KEY_BITS, deadline)
            rates.append(KEY_BITS / latency)
            lat.append(latency)
        wall = time.perf_counter() - start
        # Keys the pair's stock gained were spent for this pair (made, relayed, held);
        # keys it lost were made before the window and do not count.
        stocked_bits = (stock_level(ctx, master, slave) - stock0) * KEY_BITS
        ctx.samples.setdefault("keyrate", {})[f"{master}->{slave}"] = {
            "rates_bps": rates, "latency_ms": [x * 1000 for x in lat]}
        gen1 = generated_bits(ctx)
        hops, kinds = route_summary(ctx, master, slave)
        allowed = allowed_rate(ctx.topology, ctx.sae_node(master), ctx.sae_node(slave),
                               ctx.rate_scale)
        delivered = (KEY_BITS * len(rates) + stocked_bits) / wall
        # What the key the devices actually made in this window allows: block
        # arrivals are random, so over ~100 keys the configured mean rate is a
        # poor yardstick; the generated key is the true one.
        made = min(((gen1[lid] - gen0[lid]) / c for lid, c in cost.items() if c > 0),
                   default=float("inf"))
        made_bps = made / wall
        rows.append({
            "pair": f"{master}->{slave}", "hops": hops, "path": kinds,
            "requests": len(rates), "seconds": wall, "stocked_bits": stocked_bits,
            "rate_mean_bps": statistics.fmean(rates), "rate_std_bps": statistics.pstdev(rates),
            "delivered_bps": delivered, "allowed_bps": allowed, "made_allows_bps": made_bps,
            "ratio": delivered / made_bps if made_bps not in (0, float("inf"))
            else float("nan"),
            "qkd_bits_per_key_bit": " ".join(f"{k}:{v:g}" for k, v in cost.items()),
        })
        client.close()
        print(_table(rows[-1:], KEYRATE_COLUMNS).splitlines()[-1], flush=True)
    return rows


KEYRATE_COLUMNS = [("pair", "pair", ""), ("hops", "hops", "d"), ("path", "links", ""),
                   ("requests", "requests", "d"), ("seconds", "s", ".0f"),
                   ("stocked_bits", "stocked bits", "d"),
                   ("rate_mean_bps", "mean b/s", ".1f"), ("rate_std_bps", "std b/s", ".1f"),
                   ("delivered_bps", "delivered b/s", ".1f"),
                   ("allowed_bps", "rate allows b/s", ".1f"),
                   ("made_allows_bps", "made key allows b/s", ".1f"), ("ratio", "ratio", ".3f"),
                   ("qkd_bits_per_key_bit", "QKD bits per key bit", "")]


def _delay_stats(values_ms: list[float]) -> dict[str, float]:
    jitter = [abs(b - a) for a, b in itertools.pairwise(values_ms)]
    roll = _rolling_std(values_ms)
    return {
        "latency_median_ms": statistics.median(values_ms),
        "latency_p95_ms": _pct(values_ms, 95),
        "jitter_median_ms": statistics.median(jitter) if jitter else float("nan"),
        "jitter_p95_ms": _pct(jitter, 95),
        "roll_std_p95_ms": _pct(roll, 95),
    }


def bench_delay(ctx: Ctx, requests: int | None = None) -> list[dict[str, Any]]:
    rows = []
    n = requests or ctx.args.requests
    for master, slave in _pairs(ctx, lambda: _delay_pairs(ctx)):
        m, s = ctx.client(master), ctx.client(slave)
        enc, avail, sent = [], [], []
        deadline = time.monotonic() + 600
        first = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            sent.append(t0 - first)
            latency, _, body = _request_until_served(m, slave, KEY_BITS, deadline)
            enc.append(latency * 1000)
            key_id = body["keys"][0]["key_ID"]
            while True:
                status, got = s.dec_keys(master, [key_id])
                if status == 200:
                    break
                if status != 400 or time.monotonic() > deadline:
                    raise RuntimeError(f"dec_keys {slave}: {status} {got}")
                time.sleep(0.001)
            avail.append((time.perf_counter() - t0) * 1000)
        ctx.samples.setdefault("delay", {})[f"{master}->{slave}"] = {
            "t_s": sent, "enc_keys_ms": enc, "enc_to_available_ms": avail}
        hops, kinds = route_summary(ctx, master, slave)
        for what, values in (("enc_keys", enc), ("enc-to-available", avail)):
            rows.append({"pair": f"{master}->{slave}", "hops": hops, "path": kinds,
                         "measure": what, "requests": n, **_delay_stats(values)})
        m.close()
        s.close()
    return rows


DELAY_COLUMNS = [("pair", "pair", ""), ("hops", "hops", "d"), ("measure", "measure", ""),
                 ("latency_median_ms", "latency p50 ms", ".2f"),
                 ("latency_p95_ms", "p95 ms", ".2f"),
                 ("jitter_median_ms", "jitter p50 ms", ".2f"),
                 ("jitter_p95_ms", "jitter p95 ms", ".2f"),
                 ("roll_std_p95_ms", "roll std p95 ms", ".2f")]


def bench_concurrency(ctx: Ctx) -> list[dict[str, Any]]:
    pairs = _pairs(ctx, lambda: [(_first_sae(ctx, ctx.manifest["kmstns"][0]["id"]),
                                  _first_sae(ctx, ctx.manifest["kmstns"][1]["id"]))])
    master, slave = pairs[0]
    n = ctx.args.requests
    clients = [ctx.client(master) for _ in range(n)]
    for c in clients:  # open every connection before the burst
        c.status(slave)
    rows = []
    first = time.perf_counter()
    raw = ctx.samples["concurrency"] = {"pair": f"{master}->{slave}", "concurrency": n,
                                        "rounds": ctx.args.rounds, "requests": []}
    for round_no in range(1, ctx.args.rounds + 1):
        barrier = threading.Barrier(n)
        results: list[tuple[int, float]] = [(0, 0.0)] * n

        def one(i: int, barrier: threading.Barrier,
                results: list[tuple[int, float]], round_no: int) -> None:
            barrier.wait()
            t0 = time.perf_counter()
            status, _ = clients[i].enc_keys(slave, 1, KEY_BITS)
            results[i] = (status, (time.perf_counter() - t0) * 1000)
            raw["requests"].append({"round": round_no, "t_s": t0 - first, "status": status,
                                    "latency_ms": results[i][1]})

        threads = [threading.Thread(target=one, args=(i, barrier, results, round_no))
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lat = [ms for _, ms in results]
        failed = sum(1 for status, _ in results if status != 200)
        rows.append({"round": round_no, "pair": f"{master}->{slave}", "requests": n,
                     "failed": failed, "failed_fraction": failed / n,
                     "latency_min_ms": min(lat), "latency_median_ms": statistics.median(lat),
                     "latency_p95_ms": _pct(lat, 95), "latency_max_ms": max(lat)})
        time.sleep(0.5)
    for c in clients:
        c.close()
    return rows


CONCURRENCY_COLUMNS = [("round", "round", "d"), ("pair", "pair", ""),
                       ("requests", "requests", "d"), ("failed", "failed", "d"),
                       ("latency_min_ms", "min ms", ".1f"),
                       ("latency_median_ms", "p50 ms", ".1f"),
                       ("latency_p95_ms", "p95 ms", ".1f"), ("latency_max_ms", "max ms", ".1f")]


def bench_roundtrip(ctx: Ctx) -> list[dict[str, Any]]:
    """Whole exchanges at concurrency 1: enc_keys at the master, then dec_keys at the
    slave, back to back over kept-alive connections; pairs per second, per round."""
    rows = []
    pairs = _pairs(ctx, lambda: [(_first_sae(ctx, "KMSTN1"), _first_sae(ctx, "KMSTN3"))])
    for master, slave in pairs:
        m, s = ctx.client(master), ctx.client(slave)
        rates = []
        for round_no in range(ctx.args.rounds + 1):  # round 0 warms every connection up
            n = 10 if round_no == 0 else ctx.args.requests
            t0 = time.perf_counter()
            for _ in range(n):
                status, body = m.enc_keys(slave, 1, KEY_BITS)
                if status != 200:
                    raise RuntimeError(f"enc_keys {master}->{slave}: {status} {body}")
                status, got = s.dec_keys(master, [body["keys"][0]["key_ID"]])
                if status != 200 or got["keys"] != body["keys"]:
                    raise RuntimeError(f"dec_keys {slave}: {status} {got}")
            if round_no:
                rates.append(n / (time.perf_counter() - t0))
        hops, kinds = route_summary(ctx, master, slave)
        ctx.samples.setdefault("roundtrip", {})[f"{master}->{slave}"] = {"pairs_per_s": rates}
        rows.append({"pair": f"{master}->{slave}", "hops": hops, "path": kinds,
                     "rounds": len(rates), "requests": ctx.args.requests,
                     "pairs_per_s_median": statistics.median(rates),
                     "pairs_per_s_min": min(rates), "pairs_per_s_max": max(rates)})
        m.close()
        s.close()
    return rows


ROUNDTRIP_COLUMNS = [("pair", "pair", ""), ("hops", "hops", "d"), ("rounds", "rounds", "d"),
                     ("pairs_per_s_median", "pairs/s p50", ".1f"),
                     ("pairs_per_s_min", "min", ".1f"), ("pairs_per_s_max", "max", ".1f")]


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    return float(value) if value is not None and value.isdigit() else None


def bench_scarcity(ctx: Ctx) -> list[dict[str, Any]]:
    """Fig. 7 with the device stores empty: simultaneous requests wait for key (issue 11)."""
    pairs = _pairs(ctx, lambda: [(_first_sae(ctx, ctx.manifest["kmstns"][0]["id"]),
                                  _first_sae(ctx, ctx.manifest["kmstns"][1]["id"]))])
    master, slave = pairs[0]
    n = ctx.args.requests
    budget_s = _wait_budget_s(ctx, ctx.sae_node(master))
    # A client that waits longer than the gateway's own deadline would see a hang.
    clients = [SaeClient.from_manifest(ctx.manifest, master, timeout=budget_s + 30)
               for _ in range(n)]
    for c in clients:
        c.status(slave)
    cost = qkd_cost(ctx.topology, ctx.sae_node(master), ctx.sae_node(slave))
    rows = []
    first = time.perf_counter()
    raw = ctx.samples["scarcity"] = {"pair": f"{master}->{slave}", "concurrency": n,
                                     "rounds": ctx.args.rounds, "wait_budget_s": budget_s,
                                     "requests": []}
    for round_no in range(1, ctx.args.rounds + 1):
        drain_devices(ctx)
        # Connections left idle since the last round were closed by the edge
        # (keepalive_timeout_ms): open them again one by one, so the round's
        # 100 requests start together on live connections rather than as 100
        # handshakes from one address at once, which the edge caps
        # (max_handshakes_per_source) as it would a flood.
        for c in clients:
            c.close()
            c.status(slave)
        gen0 = generated_bits(ctx)
        barrier = threading.Barrier(n + 1)
        results: list[dict[str, Any]] = [{} for _ in range(n)]

        def one(i: int, barrier: threading.Barrier, results: list[dict[str, Any]],
                round_no: int) -> None:
            barrier.wait()
            t0 = time.perf_counter()
            try:
                status, body = clients[i].enc_keys(slave, 1, KEY_BITS)
                retry = _retry_after(clients[i].last_headers)
            except (OSError, TimeoutError) as exc:  # a hang: no answer in time
                status, body, retry = 0, {"message": type(exc).__name__}, None
                clients[i].close()
            results[i] = {"round": round_no, "t_s": t0 - first, "status": status,
                          "latency_ms": (time.perf_counter() - t0) * 1000,
                          "retry_after_s": retry, "message": body.get("message", "")
                          if status != 200 else ""}

        threads = [threading.Thread(target=one, args=(i, barrier, results, round_no))
                   for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        # What the devices make within the budget, measured at its end.
        time.sleep(budget_s)
        gen_budget = generated_bits(ctx)
        for t in threads:
            t.join()
        raw["requests"] += results
        made = min(((gen_budget[lid] - gen0[lid]) / c for lid, c in cost.items() if c > 0),
                   default=float("inf"))
        servable = n if math.isinf(made) else min(n, int(made // KEY_BITS))
        served = sum(1 for r in results if r["status"] == 200)
        failed = [r for r in results if r["status"] != 200]
        lat = [r["latency_ms"] for r in results]
        rows.append({
            "round": round_no, "pair": f"{master}->{slave}", "requests": n,
            "servable_in_budget": servable, "served": served, "failed": len(failed),
            "failed_servable": max(0, servable - served),
            "failed_503_retry_after": sum(1 for r in failed if r["status"] == 503
                                          and r["retry_after_s"] is not None),
            "failed_other": sum(1 for r in failed if r["status"] != 503
                                or r["retry_after_s"] is None),
            "latency_min_ms": min(lat), "latency_median_ms": statistics.median(lat),
            "latency_p95_ms": _pct(lat, 95), "latency_max_ms": max(lat),
            "round_s": time.perf_counter() - started})
        print(_table(rows[-1:], SCARCITY_COLUMNS).splitlines()[-1], flush=True)
    for c in clients:
        c.close()
    return rows


SCARCITY_COLUMNS = [("round", "round", "d"), ("pair", "pair", ""),
                    ("requests", "requests", "d"),
                    ("servable_in_budget", "supply serves in budget", "d"),
                    ("served", "served", "d"), ("failed", "failed", "d"),
                    ("failed_servable", "failed of servable", "d"),
                    ("failed_503_retry_after", "503+Retry-After", "d"),
                    ("failed_other", "other failures", "d"),
                    ("latency_min_ms", "min ms", ".1f"),
                    ("latency_median_ms", "p50 ms", ".1f"),
                    ("latency_p95_ms", "p95 ms", ".1f"), ("latency_max_ms", "max ms", ".1f")]


def _wait_budget_s(ctx: Ctx, node: str) -> float:
    cfg = load_node_config(ctx.state / "nodes" / node / "node.toml")
    return cfg.supply.wait_ms / 1000


def _fairness_masters(ctx: Ctx) -> list[tuple[str, str]]:
    by_node: dict[str, list[str]] = {}
    for s in ctx.manifest["saes"]:
        by_node.setdefault(s["kmstn"], []).append(s["id"])
    nodes = [k["id"] for k in ctx.manifest["kmstns"]]
    node = next((n for n in nodes if len(by_node.get(n, [])) > 1), None)
    if node is None:
        raise SystemExit("fairness needs a KMSTN with several SAEs (examples/fairness.toml)")
    other = next(n for n in nodes if n != node)
    return [(m, by_node[other][0]) for m in by_node[node]]


def bench_fairness(ctx: Ctx) -> list[dict[str, Any]]:
    """Several SAEs of one node compete for one link: delivered bits and Jain's index."""
    from kme.flows.supply import jain_index

    pairs = _pairs(ctx, lambda: _fairness_masters(ctx))
    seconds = getattr(ctx.args, "seconds", 0) or 60
    budget = _wait_budget_s(ctx, ctx.sae_node(pairs[0][0]))
    rows: list[dict[str, Any]] = []
    raw = ctx.samples["fairness"] = {"pairs": [f"{m}->{s}" for m, s in pairs],
                                     "seconds": seconds, "phases": {}}
    drain_devices(ctx)
    for phase, greedy in (("fair", None), ("one greedy", pairs[-1][0])):
        stop = time.monotonic() + seconds
        tally: dict[str, dict[str, float]] = {
            m: {"bits": 0, "served": 0, "over_quota": 0, "over_quota_retry_after": 0,
                "other": 0} for m, _ in pairs}
        events: list[tuple[float, str, int]] = []  # (when, master SAE, bits delivered)
        lock = threading.Lock()
        t_first = time.perf_counter()

        def loop(master: str, slave: str, honour: bool, tally: dict[str, dict[str, float]],
                 events: list[tuple[float, str, int]], stop: float, lock: threading.Lock,
                 t_first: float) -> None:
            client = SaeClient.from_manifest(ctx.manifest, master, timeout=budget + 30)
            try:
                while time.monotonic() < stop:
                    # A greedy SAE also asks for more at once (a block of 4 keys).
                    status, body = client.enc_keys(slave, 1 if honour else 4, KEY_BITS)
                    retry = _retry_after(client.last_headers)
                    with lock:
                        mine = tally[master]
                        if status == 200:
                            mine["bits"] += KEY_BITS * len(body["keys"])
                            mine["served"] += 1
                            events.append((time.perf_counter() - t_first, master,
                                           KEY_BITS * len(body["keys"])))
                        elif "quota" in str(body.get("message", "")):
                            mine["over_quota"] += 1
                            mine["over_quota_retry_after"] += retry is not None
                        else:
                            mine["other"] += 1
                    if status != 200:
                        # A well-behaved SAE waits as told; a greedy one comes back at once.
                        time.sleep(min(retry or 0.05, 5.0) if honour else 0.05)
            finally:
                client.close()

        threads = []
        for master, slave in pairs:
            copies = 6 if master == greedy else 1
            threads += [threading.Thread(target=loop, args=(master, slave, master != greedy,
                                                            tally, events, stop, lock, t_first))
                        for _ in range(copies)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t_first
        fair_ones = [m for m, _ in pairs if m != greedy]
        jain_all = jain_index([tally[m]["bits"] for m, _ in pairs])
        jain_fair = jain_index([tally[m]["bits"] for m in fair_ones])
        total_bits = sum(tally[m]["bits"] for m, _ in pairs)
        for master, _ in pairs:
            t = tally[master]
            rows.append({"phase": phase, "sae": master, "greedy": master == greedy,
                         "delivered_bps": t["bits"] / wall,
                         "share": t["bits"] / total_bits if total_bits else 0.0,
                         "served": int(t["served"]),
                         "over_quota": int(t["over_quota"]),
                         "over_quota_with_retry_after": int(t["over_quota_retry_after"]),
                         "other_failures": int(t["other"]), "jain_all": jain_all,
                         "jain_well_behaved": jain_fair})
        raw["phases"][phase] = {"events": events, "wall_s": wall}
        for r in rows[-len(pairs):]:
            print(_table([r], FAIRNESS_TABLE).splitlines()[-1], flush=True)
    # The link makes key in random blocks, so one phase may get more key than the
    # other: an SAE's share of what was delivered is the steadier yardstick.
    fair = {r["sae"]: r for r in rows if r["phase"] == "fair"}
    for r in rows:
        base = fair[r["sae"]]
        r["vs_fair_phase"] = (r["delivered_bps"] / base["delivered_bps"]
                              if base["delivered_bps"] else 0.0)
        r["share_vs_fair_phase"] = r["share"] / base["share"] if base["share"] else 0.0
    return rows


FAIRNESS_TABLE = [("phase", "phase", ""), ("sae", "SAE", ""), ("greedy", "greedy", ""),
                    ("delivered_bps", "delivered b/s", ".1f"), ("share", "share", ".3f"),
                    ("served", "served", "d"),
                    ("over_quota", "over quota", "d"),
                    ("over_quota_with_retry_after", "with Retry-After", "d"),
                    ("other_failures", "other failures", "d"),
                    ("jain_all", "Jain (all)", ".3f"),
                    ("jain_well_behaved", "Jain (well-behaved)", ".3f")]
FAIRNESS_COLUMNS = [*FAIRNESS_TABLE, ("vs_fair_phase", "b/s vs fair phase", ".2f"),
                    ("share_vs_fair_phase", "share vs fair phase", ".2f")]


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def bench_resources(ctx: Ctx) -> list[dict[str, Any]]:
    pids = json.loads((ctx.state / "pids.json").read_text())
    groups = {name: info["pgid"] for name, info in pids.items()}
    members = {name: group_members(pgid) for name, pgid in groups.items()}
    cpu0 = {name: sum(_cpu_seconds(p) for p in ps) for name, ps in members.items()}
    peak = dict.fromkeys(groups, 0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name, pgid in groups.items():
                rss = sum(_rss_kib(p) for p in group_members(pgid))
                peak[name] = max(peak[name], rss)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    bench_delay(ctx, requests=ctx.args.requests if ctx.args.requests != 100 else 30)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    rows = []
    for name, pgid in groups.items():
        cpu1 = sum(_cpu_seconds(p) for p in group_members(pgid))
        rows.append({"service": name, "processes": len(group_members(pgid)),
                     "cpu_s": max(0.0, cpu1 - cpu0[name]), "cpu_pct": 100 * max(
                         0.0, cpu1 - cpu0[name]) / wall, "peak_rss_mib": peak[name] / 1024})
    rows.append({"service": "TOTAL", "processes": sum(r["processes"] for r in rows),
                 "cpu_s": sum(r["cpu_s"] for r in rows),
                 "cpu_pct": sum(r["cpu_pct"] for r in rows),
                 "peak_rss_mib": sum(r["peak_rss_mib"] for r in rows)})
    print(f"(workload: delay benchmark, {wall:.1f} s wall)")
    return rows


RESOURCE_COLUMNS = [("service", "service", ""), ("processes", "procs", "d"),
                    ("cpu_s", "CPU s", ".2f"), ("cpu_pct", "CPU %", ".1f"),
                    ("peak_rss_mib", "peak RSS MiB", ".1f")]


def run_bench(kind: str, state: Path, args: Any) -> int:
    manifest_path = state / "federation.json"
    if not manifest_path.exists():
        print(f"no running federation in {state} (run 'kmstn federation up' first)")
        return 1
    manifest = json.loads(manifest_path.read_text())
    topology = load_topology(manifest["topology"])
    scale = _rate_scale(state, topology)
    ctx = Ctx(state, manifest, topology, Path(args.out) if args.out else state / "bench", args,
              scale)
    kinds = ["keyrate", "delay", "concurrency", "resources"] if kind == "all" else [kind]
    runners: dict[str, tuple[Callable[[Ctx], list[dict[str, Any]]], list[tuple[str, str, str]]]]
    runners = {"keyrate": (bench_keyrate, KEYRATE_COLUMNS),
               "delay": (bench_delay, DELAY_COLUMNS),
               "concurrency": (bench_concurrency, CONCURRENCY_COLUMNS),
               "resources": (bench_resources, RESOURCE_COLUMNS),
               "scarcity": (bench_scarcity, SCARCITY_COLUMNS),
               "fairness": (bench_fairness, FAIRNESS_COLUMNS),
               "roundtrip": (bench_roundtrip, ROUNDTRIP_COLUMNS)}
    for name in kinds:
        fn, columns = runners[name]
        print(f"\n== {name} ({manifest['name']}, QKD rate scale {scale:g}) ==", flush=True)
        rows = fn(ctx)
        print(_table(rows, columns))
        meta = {"federation": manifest["name"], "qkd_rate_scale": scale,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write(ctx, name, rows, {**meta, "samples": ctx.samples.get(name)})
        from lab.plots import figures

        pngs = figures(name, rows, ctx.samples.get(name), meta, ctx.out)
        print(f"(written: {ctx.out / (name + '.csv')}, {ctx.out / (name + '.json')}"
              + "".join(f", {p}" for p in pngs) + ")")
    return 0


def _rate_scale(state: Path, topology: Topology) -> float:
    """The emulator rate scale the federation runs with (from its sim files)."""
    for link in topology.qkd_links:
        path = state / "sim" / f"{link.id}.toml"
        if path.exists():
            with path.open("rb") as fh:
                return float(tomllib.load(fh).get("rate_scale", 1.0))
    return 1.0


