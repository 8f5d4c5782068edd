"""Benchmark of the QKD device emulator with the node's own southbound client.

    python -m lab.qkdsim.bench [--quick] [--seconds 10] [--drain-seconds 60]

Starts a real ``python -m lab.qkdsim`` process for one link on 127.0.0.1
(throwaway CA, mutual TLS) and drives it with :class:`kme.qkd.QkdDeviceClient`
(keep-alive http.client connections, borrowed per thread), then prints:

(a) enc_keys throughput with the rate not limiting (1 Gb/s, full store):
    requests/s and p50/p95 latency at concurrency 1 and 8 (threads sharing
    one client), one 256-bit key per request;
(b) transport: one enc_keys round trip over one keep-alive connection
    through requests, urllib3, plain http.client and kme.qkd (p50/p95), the
    measurement behind the southbound client's choice of http.client;
(c) delivered rate: the link at 2,500 b/s, a client draining it
    continuously (enc_keys of one 256-bit key, a 5 ms pause after each 503)
    for ``--drain-seconds``; delivered bits/s against the configured rate,
    and against what the rate model actually generated in that window (the
    model is random: blocks of ``--block-size`` bits with gamma gaps of shape
    ``--shape``; fewer, larger blocks mean more spread around the mean).

Client and server share the machine: on 2 cores the client's own cost
(HTTP and TLS in Python) is part of every number.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kme.config import QkdDeviceAccess, QkdLink, TlsFiles, load_topology
from kme.errors import ErrorCode, KmstnError
from kme.qkd import QkdDeviceClient
from kme.types import NodeId
from lab.pki import CertificateAuthority
from lab.qkdsim.config import HEALTH_PATH, sim_healthy, write_sim_config

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = CertificateAuthority.create(root / "ca", days=1)
        self.certs = {name: self.ca.issue(name, root / "certs", ips=(HOST,), days=1)
                      for name in ("A", "B", "L-alice", "L-bob")}

    @contextmanager
    def link(self, rate: float, block_size: int, **sim: Any) -> Iterator[QkdLink]:
        sim_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in sim.items())
        topo = self.root / "topology.toml"
        topo.write_text(f"""[federation]
name = "bench"

[[kmstn]]
id = "A"
host = "{HOST}"
etsi014_port = {_free_port()}
etsi020_port = {_free_port()}
relay_port = {_free_port()}

[[kmstn]]
id = "B"
host = "{HOST}"
etsi014_port = {_free_port()}
etsi020_port = {_free_port()}
relay_port = {_free_port()}

[[qkd_link]]
id = "L"
a = "A"
b = "B"
secret_key_rate = {rate}
block_size = {block_size}
max_key_count = 100000
max_key_per_request = 128
alice = {{ host = "{HOST}", port = {_free_port()} }}
bob = {{ host = "{HOST}", port = {_free_port()} }}

[qkd_link.sim]
{sim_lines}""")
        cfg = write_sim_config(self.root / "sim.toml", topology=topo, link="L",
                               ca=self.ca.cert_path, alice=self.certs["L-alice"],
                               bob=self.certs["L-bob"], log_level="warning")
        link = load_topology(topo).qkd_links[0]
        log = (self.root / "qkdsim.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "lab.qkdsim", "--config", str(cfg)],  # noqa: S603
                                stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while not sim_healthy(link, self.ca.cert_path, self.certs, timeout=1.0):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"emulator did not start; see {log.name}")
                time.sleep(0.05)
            yield link
        finally:
            proc.terminate()
            proc.wait(15)
            log.close()

    def client(self, link: QkdLink, node: str = "A") -> QkdDeviceClient:
        issued = self.certs[node]
        access = QkdDeviceAccess(link.id, TlsFiles(self.ca.cert_path, issued.cert, issued.key),
                                 timeout_ms=5000)
        return QkdDeviceClient(link, NodeId(node), access)

    def health(self, link: QkdLink) -> dict[str, Any]:
        assert link.alice is not None  # noqa: S101 - a bench, the link was just loaded
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.load_cert_chain(str(self.certs["L-alice"].cert), str(self.certs["L-alice"].key))
        conn = http.client.HTTPSConnection(link.alice.host, link.alice.port, context=ctx,
                                           timeout=5)
        try:
            conn.request("GET", HEALTH_PATH)
            data: dict[str, Any] = json.loads(conn.getresponse().read())
            return data
        finally:
            conn.close()


def _summary(label: str, concurrency: int, latencies: list[float], errors: int,
             elapsed: float) -> dict[str, Any]:
    lat = sorted(latencies)
    return {
        "client": label,
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "requests_per_s": len(lat) / elapsed,
        "p50_ms": statistics.median(lat) * 1e3 if lat else 0.0,
        "p95_ms": lat[int(0.95 * (len(lat) - 1))] * 1e3 if lat else 0.0,
    }


def _kmstn_worker(client: QkdDeviceClient, barrier: threading.Barrier, stop_at: list[float],
                  latencies: list[float], errors: list[int]) -> None:
    barrier.wait()
    while (t0 := time.perf_counter()) < stop_at[0]:
        try:
            client.enc_keys(1)
        except KmstnError:
            errors.append(1)
            continue
        latencies.append(time.perf_counter() - t0)


def _kmstn_client_run(client: QkdDeviceClient, concurrency: int,
                      seconds: float) -> dict[str, Any]:
    """Threads sharing one kme.qkd client (its session pool: one session per thread)."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[int] = []
    barrier = threading.Barrier(concurrency + 1)
    stop_at = [time.perf_counter() + 3600.0]
    threads = [threading.Thread(target=_kmstn_worker,
                                args=(client, barrier, stop_at, latencies[i], errors))
               for i in range(concurrency)]
    for t in threads:
        t.start()
    t_begin = time.perf_counter()
    stop_at[0] = t_begin + seconds
    barrier.wait()
    for t in threads:
        t.join()
    return _summary("kme.qkd (http.client pool, threads)", concurrency,
                    [x for lat in latencies for x in lat], len(errors),
                    time.perf_counter() - t_begin)


def _lean_worker(args: tuple[str, int, str, str, str, float, float]) -> tuple[list[float], int]:
    """One process, one keep-alive mTLS connection (http.client), enc_keys in a loop."""
    host, port, ca, cert, key, start_at, stop_at = args
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    body = b'{"number":1}'
    headers = {"Content-Type": "application/json"}
    conn.request("POST", "/api/v1/keys/B/enc_keys", body, headers)
    conn.getresponse().read()  # handshake outside the measurement
    latencies: list[float] = []
    errors = 0
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < stop_at:
        t0 = time.perf_counter()
        conn.request("POST", "/api/v1/keys/B/enc_keys", body, headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            latencies.append(time.perf_counter() - t0)
        else:
            errors += 1
    conn.close()
    return latencies, errors


def _lean_client_run(bench: Bench, link: QkdLink, concurrency: int,
                     seconds: float) -> dict[str, Any]:
    """Separate processes, so the client side is not one GIL: the emulator's own capacity."""
    device = link.device_of(link.a)
    issued = bench.certs["A"]
    start_at = time.time() + 2.0  # after every worker has spawned and connected
    job = (device.host, device.port, str(bench.ca.cert_path), str(issued.cert),
           str(issued.key), start_at, start_at + seconds)
    with multiprocessing.get_context("spawn").Pool(concurrency) as pool:
        results = pool.map(_lean_worker, [job] * concurrency)
    return _summary("http.client (one process per connection)", concurrency,
                    [x for lat, _ in results for x in lat], sum(e for _, e in results),
                    seconds)


def throughput(bench: Bench, seconds: float) -> list[dict[str, Any]]:
    rows = []
    with bench.link(rate=1e9, block_size=1 << 20) as link:
        client = bench.client(link)
        client.enc_keys(1)  # open the first connection outside the measurement
        for concurrency in (1, 8):
            rows.append(_kmstn_client_run(client, concurrency, seconds))
        client.close()
        for concurrency in (1, 8):
            rows.append(_lean_client_run(bench, link, concurrency, seconds))
    return rows


def transports(bench: Bench, requests_n: int = 500) -> list[tuple[str, float, float]]:
    """(b) One enc_keys round trip, one connection, per HTTP client library.

    The measurement behind the southbound client's transport: the same
    keep-alive mutual-TLS request through requests, urllib3, plain
    http.client and kme.qkd (http.client underneath). requests and urllib3
    are test-extra dependencies; a library that is not installed is skipped.
    """
    rows: list[tuple[str, float, float]] = []
    with bench.link(rate=1e9, block_size=1 << 20) as link:
        device = link.device_of(link.a)
        issued = bench.certs["A"]
        ctx = ssl.create_default_context(cafile=str(bench.ca.cert_path))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(issued.cert), str(issued.key))
        url_path = "/api/v1/keys/B/enc_keys"
        body = b'{"number":1,"size":256}'
        headers = {"Content-Type": "application/json"}
        calls: list[tuple[str, Any]] = []
        try:
            import requests

            session = requests.Session()
            session.trust_env = False
            session.verify = str(bench.ca.cert_path)
            session.cert = (str(issued.cert), str(issued.key))
            url = f"https://{device.host}:{device.port}{url_path}"
            calls.append(("requests.Session", lambda: session.post(
                url, data=body, headers=headers, timeout=5).raise_for_status()))
        except ImportError:
            print("    requests: not installed (test extra), skipped")
        try:
            import urllib3

            pool = urllib3.HTTPSConnectionPool(device.host, device.port, ssl_context=ctx,
                                               maxsize=1, retries=False, timeout=5.0)

            def via_urllib3() -> None:
                if pool.request("POST", url_path, body=body, headers=headers).status != 200:
                    raise RuntimeError("enc_keys failed")
            calls.append(("urllib3 pool", via_urllib3))
        except ImportError:
            print("    urllib3: not installed (test extra), skipped")
        conn = http.client.HTTPSConnection(device.host, device.port, context=ctx, timeout=5)

        def via_http_client() -> None:
            conn.request("POST", url_path, body, headers)
            resp = conn.getresponse()
            json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError("enc_keys failed")
        calls.append(("http.client", via_http_client))
        client = bench.client(link)
        calls.append(("kme.qkd (node's client)", lambda: client.enc_keys(1, 256)))
        for name, call in calls:
            for _ in range(20):  # connection and handshake outside the measurement
                call()
            times = []
            for _ in range(requests_n):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1000)
            rows.append((name, statistics.median(times), statistics.quantiles(times, n=20)[18]))
        client.close()
        conn.close()
    return rows


def drain(bench: Bench, seconds: float, rate: float, block_size: int, shape: float,
          seed: int) -> dict[str, float]:
    with bench.link(rate=rate, block_size=block_size, arrival_shape=shape, seed=seed) as link:
        client = bench.client(link)
        # Empty the store first, so the window counts only bits generated in it.
        while True:
            try:
                client.enc_keys(128 if link.max_key_per_request >= 128 else 1)
            except KmstnError as exc:
                if exc.code is not ErrorCode.INSUFFICIENT_KEY:
                    raise
                try:
                    client.enc_keys(1)
                except KmstnError:
                    break
        before = bench.health(link)
        t0 = time.monotonic()
        delivered = 0
        while time.monotonic() - t0 < seconds:
            try:
                delivered += sum(k.size_bits for k in client.enc_keys(1))
            except KmstnError as exc:
                if exc.code is not ErrorCode.INSUFFICIENT_KEY:
                    raise
                time.sleep(0.005)
        elapsed = time.monotonic() - t0
        after = bench.health(link)
        client.close()
    generated = after["generated_bits"] - before["generated_bits"]
    return {
        "seconds": elapsed,
        "configured_bps": rate,
        "delivered_bps": delivered / elapsed,
        "generated_bps": generated / elapsed,
        "delivered_vs_configured_pct": 100 * delivered / elapsed / rate,
        "delivered_vs_generated_pct": 100 * delivered / generated if generated else 0.0,
        "blocks": after["blocks"] - before["blocks"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.qkdsim.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (2 s per concurrency, 10 s drain)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="duration of each throughput run")
    parser.add_argument("--drain-seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=2500.0, help="bits/s for the drain run")
    parser.add_argument("--block-size", type=int, default=128,
                        help="bits per key block in the drain run")
    parser.add_argument("--shape", type=float, default=4.0,
                        help="gamma shape of the gaps between blocks (1 = exponential)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    seconds, drain_seconds = (2.0, 10.0) if args.quick else (args.seconds, args.drain_seconds)
    with tempfile.TemporaryDirectory(prefix="qkdsim-bench-") as tmp:
        bench = Bench(Path(tmp))
        print("(a) enc_keys, one 256-bit key per request, rate not limiting, "
              "keep-alive mutual TLS")
        for row in throughput(bench, seconds):
            print(f"    {row['client']:<42} concurrency {row['concurrency']}: "
                  f"{row['requests_per_s']:6.0f} req/s  "
                  f"p50 {row['p50_ms']:.2f} ms  p95 {row['p95_ms']:.2f} ms  "
                  f"({row['requests']:.0f} requests, {row['errors']:.0f} errors)")
        print("(b) transport: one enc_keys round trip over one keep-alive mutual-TLS "
              "connection, by client library")
        for name, p50, p95 in transports(bench, 100 if args.quick else 500):
            print(f"    {name:<28} p50 {p50:.3f} ms  p95 {p95:.3f} ms")
        r = drain(bench, drain_seconds, args.rate, args.block_size, args.shape, args.seed)
        print(f"(c) delivered rate, {r['seconds']:.0f} s continuous drain, blocks of "
              f"{args.block_size} bits, gamma shape {args.shape}, seed {args.seed}")
        print(f"    configured {r['configured_bps']:.0f} b/s  delivered "
              f"{r['delivered_bps']:.0f} b/s ({r['delivered_vs_configured_pct']:.1f}% of "
              f"configured)  model generated {r['generated_bps']:.0f} b/s in "
              f"{r['blocks']:.0f} blocks (delivered {r['delivered_vs_generated_pct']:.1f}% "
              "of generated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
