"""Benchmark: enc_keys at a master's gateway, and enc-to-available at a slave 2 hops away.

    python -m gateway.bench [--requests 200] [--concurrency 4]

Starts a real federation A =QKD= B --PQC-- C with the launcher (every service
its own process; emulated QKD rate high enough not to limit), once per
delivery mode (confirmed, then concurrent), and measures with keep-alive
mTLS SAE clients:

- enc_keys latency p50/p95 and requests/s at A's ETSI 014 gateway, for a
  slave on the QKD neighbour B and for a slave on C (2 hops: QKD then PQC),
  at concurrency 1 and ``--concurrency``;
- enc-to-available at the slave on C: from the start of the master's
  enc_keys until the slave's dec_keys (retried while 400) returns the key.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lab.federation import Federation
from lab.saeclient import SaeClient

TOPOLOGY = """
[federation]
name = "gateway-bench"

[[kmstn]]
id = "A"
host = "127.0.0.51"
etsi014_port = 18014
etsi020_port = 18020
relay_port = 18021

[[kmstn]]
id = "B"
host = "127.0.0.52"
etsi014_port = 18014
etsi020_port = 18020
relay_port = 18021

[[kmstn]]
id = "C"
host = "127.0.0.53"
etsi014_port = 18014
etsi020_port = 18020
relay_port = 18021

[[qkd_link]]
id = "QKD-A-B"
a = "A"
b = "B"
secret_key_rate = 10_000_000
block_size = 65536
max_key_count = 500000
sim = { initial_keys = 20000 }
alice = { host = "127.0.0.51", port = 18900 }
bob = { host = "127.0.0.52", port = 18900 }

[[pqc_link]]
id = "PQC-B-C"
a = "B"
b = "C"

[[sae]]
id = "master"
kmstn = "A"

[[sae]]
id = "slave-b"
kmstn = "B"

[[sae]]
id = "slave-c"
kmstn = "C"
"""


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def enc_latency(manifest: dict[str, Any], slave: str, n: int, concurrency: int
                ) -> dict[str, float]:
    clients = [SaeClient.from_manifest(manifest, "master") for _ in range(concurrency)]
    for c in clients:  # warm the connections and the relay's key pools
        for _ in range(5):
            c.enc_keys(slave)
    lat: list[float] = []
    lock = threading.Lock()
    per = n // concurrency

    def run(c: SaeClient) -> None:
        mine = []
        for _ in range(per):
            t0 = time.perf_counter()
            status, body = c.enc_keys(slave)
            if status != 200:
                raise RuntimeError(f"enc_keys: {status} {body}")
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            lat.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return {"p50_ms": statistics.median(lat), "p95_ms": _pct(lat, 95),
            "req_per_s": len(lat) / wall}


def enc_to_available(manifest: dict[str, Any], n: int) -> dict[str, float]:
    m = SaeClient.from_manifest(manifest, "master")
    s = SaeClient.from_manifest(manifest, "slave-c")
    m.enc_keys("slave-c")
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = m.enc_keys("slave-c")
        if status != 200:
            raise RuntimeError(f"enc_keys: {status} {body}")
        key_id = body["keys"][0]["key_ID"]
        while True:
            status, got = s.dec_keys("master", [key_id])
            if status == 200:
                break
            if status != 400:
                raise RuntimeError(f"dec_keys: {status} {got}")
        lat.append((time.perf_counter() - t0) * 1000)
    m.close()
    s.close()
    return {"p50_ms": statistics.median(lat), "p95_ms": _pct(lat, 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kmgb-", dir="/tmp"))
    (root / "topology.toml").write_text(TOPOLOGY)
    rows = []
    try:
        for mode in ("confirmed", "concurrent"):
            fed = Federation(root / "topology.toml", root / mode, delivery=mode)
            manifest = fed.up(timeout=180)
            try:
                for slave, where in (("slave-b", "QKD neighbour (1 hop)"),
                                     ("slave-c", "2 hops (QKD, PQC)")):
                    for conc in (1, args.concurrency):
                        r = enc_latency(manifest, slave, args.requests, conc)
                        rows.append((mode, f"enc_keys -> {where}", conc, r["p50_ms"],
                                     r["p95_ms"], r["req_per_s"]))
                        print(f"{rows[-1]}", flush=True)
                r = enc_to_available(manifest, args.requests)
                rows.append((mode, "enc-to-available, 2 hops", 1, r["p50_ms"], r["p95_ms"],
                             float("nan")))
            finally:
                fed.down()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'mode':<11} {'measure':<34} {'conc':>4} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'req/s':>8}")
    for mode, what, conc, p50, p95, rps in rows:
        print(f"{mode:<11} {what:<34} {conc:>4} {p50:>8.2f} {p95:>8.2f} {rps:>8.1f}")
    print(f"({args.requests} requests per row; keep-alive mTLS ETSI 014 clients; "
          "every service a separate process on this machine)")


if __name__ == "__main__":
    main()
