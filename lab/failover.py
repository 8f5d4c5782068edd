"""Keys across a federation while a QKD link's devices stop: how long until keys cross again.

    python -m lab.demo --topology examples/mesh.toml --fail-link QKD-W1-W2

One master SAE asks for keys for one slave without pause (each key then
taken by the slave and compared); after a warm-up the emulated devices of
the chosen QKD link are killed (SIGKILL, as a power cut would). Routing
notices (the relays poll their devices), the link leaves the two ends' next
link-state records, and keys take another path. Measured per run:

* **fault to first key over the new path**: from the kill to the first
  key the master got whose relay log lines show it crossed a node of the
  new path (``ext_keys handled`` names its key ID), on the client's clock;
* every key the master got is taken by its slave exactly once with the
  same bytes (a second take is refused), none is taken that the master did
  not get, and once the devices are back and every void has been delivered
  no copy is left in any keyvault (none lost, none duplicated).

Requests that fail meanwhile get 503 (the device is gone, or a route is
being recomputed); the master simply asks again, as an SAE would.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from keyvault.client import KeyVaultClient
from kme.channels import internal_channel
from kme.config import Topology, load_node_config
from lab.federation import Federation
from lab.logs import read_logs
from lab.saeclient import SaeClient
from routing.client import RoutingClient

__all__ = ["FailoverRun", "report", "run_failover"]


@dataclass
class _Got:
    at: float  # time.monotonic() when the master had the key
    key_id: str
    taken: bool  # the slave got the same bytes
    again_refused: bool  # a second take was refused


@dataclass
class FailoverRun:
    link: str
    path_before: tuple[str, ...]
    path_after: tuple[str, ...]
    first_new_s: float | None
    keys: int
    keys_before: int
    keys_after: int
    refused: int  # 503 answers
    mismatched: int
    taken_twice: int
    left_in_vaults: int

    @property
    def ok(self) -> bool:
        return (self.first_new_s is not None and not self.mismatched and not self.taken_twice
                and not self.left_in_vaults and self.path_after != self.path_before)


def _route(fed: Federation, node: str, slave: str) -> tuple[str, ...]:
    cfg = load_node_config(fed.node_file(node))
    channel = internal_channel(cfg, "routing")
    try:
        return tuple(RoutingClient(channel, timeout=5).route_to_sae(slave).path)
    finally:
        channel.close()


def _left(fed: Federation, topology: Topology) -> int:
    total = 0
    for node, k in topology.kmstns.items():
        if k.kind != "kmstn":
            continue
        cfg = load_node_config(fed.node_file(node))
        channel = internal_channel(cfg, "keyvault")
        try:
            total += KeyVaultClient(channel).total_keys()
        finally:
            channel.close()
    return total


def _nodes_per_key(fed: Federation) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for line in read_logs(fed.state / "logs"):
        r = line.record
        if r.get("msg") == "ext_keys handled" and isinstance(r.get("key_ids"), list):
            for k in r["key_ids"]:
                seen.setdefault(str(k), set()).add(str(r.get("node", "")))
    return seen


def run_failover(fed: Federation, manifest: dict[str, Any], topology: Topology, link: str,
                 master: str, slave: str, warm_s: float = 3.0, after_s: float = 8.0,
                 timeout: float = 120.0) -> FailoverRun:
    """One run: keys flowing, the link's devices killed, keys flowing again; devices back."""
    src = topology.saes[master]  # type: ignore[index]
    ends = {topology.link(link).a, topology.link(link).b}
    # A link that was just back up is announced up only after the hold-down
    # (no flapping): wait for the route to use it again before failing it.
    deadline = time.monotonic() + timeout
    before = _route(fed, src, slave)
    while not any({a, b} == ends for a, b in itertools.pairwise(before)):
        if time.monotonic() > deadline:
            raise SystemExit(f"{link} is not on the path {'-'.join(before)} from {master} "
                             f"to {slave}: nothing to fail over from")
        time.sleep(0.2)
        before = _route(fed, src, slave)
    got: list[_Got] = []
    refused = [0]
    stop = threading.Event()
    client = SaeClient.from_manifest(manifest, master)
    taker = SaeClient.from_manifest(manifest, slave)

    def loop() -> None:
        while not stop.is_set():
            status, body = client.enc_keys(slave, number=1, size=256)
            if status != 200:
                refused[0] += 1
                time.sleep(0.02)
                continue
            at = time.monotonic()
            key = body["keys"][0]
            s1, b1 = taker.dec_keys(master, [key["key_ID"]])
            s2, _ = taker.dec_keys(master, [key["key_ID"]])
            got.append(_Got(at, key["key_ID"], s1 == 200 and b1["keys"] == [key], s2 == 400))

    worker = threading.Thread(target=loop, name="failover-master")
    worker.start()
    try:
        time.sleep(warm_s)
        fault = time.monotonic()
        fed.stop_service(f"{link}/qkdsim", kill=True)
        time.sleep(after_s)
    finally:
        stop.set()
        worker.join(60)
        client.close()
        taker.close()
    after = _route(fed, src, slave)
    fed.start_service(f"{link}/qkdsim", timeout=timeout)
    new_nodes = set(after) - set(before)
    by_key = _nodes_per_key(fed)
    first_new = next((g.at - fault for g in got
                      if g.at > fault and by_key.get(g.key_id, set()) & new_nodes), None)
    deadline = time.monotonic() + timeout
    left = _left(fed, topology)
    while left and time.monotonic() < deadline:  # voids of failed requests still travel
        time.sleep(0.5)
        left = _left(fed, topology)
    return FailoverRun(
        link, before, after, first_new, len(got),
        sum(1 for g in got if g.at <= fault), sum(1 for g in got if g.at > fault), refused[0],
        sum(1 for g in got if not g.taken), sum(1 for g in got if not g.again_refused), left)


def report(runs: list[FailoverRun]) -> str:
    lines = []
    for i, r in enumerate(runs, 1):
        first = f"{r.first_new_s * 1000:.0f} ms" if r.first_new_s is not None else "never"
        lines.append(
            f"  run {i}: {r.link} devices killed; path {'-'.join(r.path_before)} -> "
            f"{'-'.join(r.path_after)}; fault to first key over the new path: {first}; "
            f"keys {r.keys_before} before, {r.keys_after} after ({r.refused} x 503 meanwhile); "
            f"taken once with the same bytes: {r.keys - r.mismatched}/{r.keys}, taken twice: "
            f"{r.taken_twice}; copies left in keyvaults: {r.left_in_vaults}")
    firsts = [r.first_new_s for r in runs if r.first_new_s is not None]
    if firsts:
        lines.append(f"  median fault to first key over the new path: "
                     f"{statistics.median(firsts) * 1000:.0f} ms over {len(firsts)} runs "
                     f"(worst {max(firsts) * 1000:.0f} ms; target <= 3000 ms)")
    return "\n".join(lines)

