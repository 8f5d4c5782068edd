"""Same-run A/B of two builds of the ETSI 014 gateway on one federation (a development benchmark).

    python tests/perf/ab_gateway.py STATE --other-tree PATH [--master SAE1] [--slave SAE2]
                                    [--rounds 400] [--port 8114]

On a running federation (``kmstn federation up --state STATE``; a stock for
the pair keeps enc_keys off the relay path, e.g. a ``[[supply.stocks]]`` of a
few thousand keys at ``--qkd-rate-scale 100``), it starts a second 014
gateway at the master's and at the slave's node from the checkout at
``--other-tree`` (its own ``.venv``), listening on ``--port`` beside this
build's, with the same node file otherwise: both talk to the same relay and
keyvault. Then, alternating the order round by round, each build serves a
round of /healthz, Get status, enc_keys and dec_keys of that key. It prints
each request's median for both builds and their ratio, and the CPU the two
gateways of each build used per round; then stops the second gateways.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from lab.saeclient import SaeClient

REQUESTS = ("healthz", "status", "enc_keys", "dec_keys", "enc+dec")


def _cpu_ms(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total * 1000.0 / os.sysconf("SC_CLK_TCK")  # clock ticks to ms


def _listeners(host: str, port: int) -> list[int]:
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return sorted({int(p.split(",")[0]) for line in out.splitlines()
                   if f"{host}:{port}" in line for p in line.split("pid=")[1:]})


def _node_file_on(node_file: Path, node: str, port: int) -> Path:
    text = node_file.read_text()
    moved, count = re.subn(rf'(id = "{node}"\nhost = "[^"]+"\netsi014_port = )\d+',
                           rf"\g<1>{port}", text, count=1)
    if count != 1:
        raise SystemExit(f"{node_file}: no etsi014_port of {node} found")
    out = node_file.with_name(f"node-ab-{port}.toml")
    out.write_text(moved)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("state", type=Path)
    p.add_argument("--other-tree", type=Path, required=True)
    p.add_argument("--master", default="SAE1")
    p.add_argument("--slave", default="SAE2")
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--port", type=int, default=8114)
    args = p.parse_args()
    manifest: dict[str, Any] = json.loads((args.state / "federation.json").read_text())
    saes = {s["id"]: s for s in manifest["saes"]}
    urls = {k["id"]: k["etsi014_url"] for k in manifest["kmstns"]}

    def client(sae: str, url: str) -> SaeClient:
        entry = saes[sae]
        return SaeClient(sae, url, entry["cert"], entry["key"], manifest["ca"])

    started: list[subprocess.Popen[bytes]] = []
    clients: dict[str, tuple[SaeClient, SaeClient]] = {}
    pids: dict[str, list[int]] = {"this": [], "other": []}
    try:
        other_urls = {}
        for sae in (args.master, args.slave):
            node = saes[sae]["kmstn"]
            host, port = re.fullmatch(r"https://([^:/]+):(\d+)", urls[node]).groups()  # type: ignore[union-attr]
            pids["this"] += _listeners(host, int(port))
            node_file = _node_file_on(args.state / "nodes" / node / "node.toml", node, args.port)
            started.append(subprocess.Popen(
                [str(args.other_tree / ".venv/bin/python"), "-m", "gateway", "--api", "etsi014",
                 "--config", str(node_file)], cwd=args.other_tree,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            other_urls[sae] = f"https://{host}:{args.port}"
            for _ in range(200):
                if _listeners(host, args.port):
                    break
                time.sleep(0.1)
            else:
                raise SystemExit(f"the other build's gateway at {node} did not start")
            pids["other"] += _listeners(host, args.port)
        clients["this"] = (client(args.master, urls[saes[args.master]["kmstn"]]),
                           client(args.slave, urls[saes[args.slave]["kmstn"]]))
        clients["other"] = (client(args.master, other_urls[args.master]),
                            client(args.slave, other_urls[args.slave]))
        rows: dict[str, dict[str, list[float]]] = {b: {r: [] for r in REQUESTS} for b in clients}

        def timed(call: Any, want: int) -> tuple[float, Any]:
            time.sleep(0.002)
            t0 = time.perf_counter()
            status, body = call()
            took = (time.perf_counter() - t0) * 1000
            if status != want:
                raise SystemExit(f"HTTP {status}: {body}")
            return took, body

        def one_round(build: str) -> None:
            master, slave = clients[build]
            row = rows[build]
            row["healthz"].append(timed(lambda: master.get("/healthz"), 200)[0])
            row["status"].append(timed(lambda: master.status(args.slave), 200)[0])
            enc, body = timed(lambda: master.enc_keys(args.slave, 1), 200)
            key_id = body["keys"][0]["key_ID"]
            dec, _ = timed(lambda: slave.dec_keys(args.master, [key_id]), 200)
            row["enc_keys"].append(enc)
            row["dec_keys"].append(dec)
            row["enc+dec"].append(enc + dec)

        for build in clients:  # warm both
            one_round(build)
            for values in rows[build].values():
                values.clear()
        cpu = {b: 0.0 for b in clients}
        for i in range(args.rounds):
            for build in (("this", "other") if i % 2 else ("other", "this")):
                before = _cpu_ms(pids[build])
                one_round(build)
                cpu[build] += _cpu_ms(pids[build]) - before
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.wait(timeout=30)
    print(f"{args.master} -> {args.slave}, {args.rounds} rounds per build, alternated; "
          f"other build: {args.other_tree}")
    print(f"  {'request':<10} {'other p50':>10} {'this p50':>10} {'this/other':>11}")
    for name in REQUESTS:
        other, this = (statistics.median(rows[b][name]) for b in ("other", "this"))
        print(f"  {name:<10} {other:8.2f} ms {this:8.2f} ms {this / other:11.2f}")
    print(f"  gateway CPU per round (both nodes' 014 gateways): other "
          f"{cpu['other'] / args.rounds:.2f} ms, this {cpu['this'] / args.rounds:.2f} ms")


if __name__ == "__main__":
    main()
