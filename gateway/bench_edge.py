"""Benchmark: the ETSI listeners under hostile clients, and the edge's cost on the normal path.

    python -m gateway.bench_edge [--requests 200] [--before DIR]

Starts a real federation A =QKD= B --PQC-- C --PQC-- D with the launcher
(every service its own process), master SAE at A, slave at D, and prints:

- the normal path: ETSI 014 status (kept-alive connection) and a 3-hop
  enc_keys A->B->C->D, p50/p99; with ``--before DIR`` the same once more
  with every node process running the code at DIR (a worktree of the
  commit before the edge), for the before/after cost;
- under attack, with the hostile clients held the whole time by a separate
  process from many 127.0.0.x source addresses (reopened when the server
  drops them):
  * A's 014 listener: 200 stalled TLS handshakes (a TLS record header, then
    nothing), 200 idle TCP connections, 64 authenticated slow-header SAEs
    (one header byte per second); legitimate: status on a new TLS
    connection per request;
  * B's 020 listener: 200 stalled handshakes, 200 idle TCP connections;
    legitimate: 3-hop enc_keys whose path crosses B's 020 listener;
  how many legitimate requests were served, and p50/p99.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing as mp
import os
import shutil
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from lab.federation import Federation
from lab.saeclient import SaeClient

HOSTS = {"A": "127.0.0.61", "B": "127.0.0.62", "C": "127.0.0.63", "D": "127.0.0.64"}
TOPOLOGY = """
[federation]
name = "edge-bench"
""" + "".join(f"""
[[kmstn]]
id = "{n}"
host = "{h}"
etsi014_port = 19014
etsi020_port = 19020
relay_port = 19021
""" for n, h in HOSTS.items()) + """
[[qkd_link]]
id = "QKD-A-B"
a = "A"
b = "B"
secret_key_rate = 10_000_000
block_size = 65536
max_key_count = 500000
sim = { initial_keys = 20000 }
alice = { host = "127.0.0.61", port = 19900 }
bob = { host = "127.0.0.62", port = 19900 }

[[pqc_link]]
id = "PQC-B-C"
a = "B"
b = "C"

[[pqc_link]]
id = "PQC-C-D"
a = "C"
b = "D"

[[sae]]
id = "master"
kmstn = "A"

[[sae]]
id = "intruder"
kmstn = "A"

[[sae]]
id = "slave-d"
kmstn = "D"
"""
STALL = b"\x16\x03\x01\x02\x00"


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


# -- the hostile clients (a separate process, so they do not share our GIL) ------------------


def _hold_raw(host: str, port: int, sources: list[str], count: int, payload: bytes,
              held: Synchronized[int], stop: Any) -> None:
    """``count`` TCP connections spread over ``sources``, reopened when dropped."""
    import selectors

    sel = selectors.DefaultSelector()
    slots = [sources[i % len(sources)] for i in range(count)]
    open_: dict[int, tuple[socket.socket, int]] = {}
    pending = list(range(count))
    while not stop.is_set():
        for slot in pending[:50]:  # a few at a time: connect() may block briefly
            s = socket.socket()
            try:
                s.bind((slots[slot], 0))
                s.settimeout(2)
                s.connect((host, port))
                if payload:
                    s.sendall(payload)
                s.setblocking(False)
            except OSError:
                s.close()
                continue
            pending.remove(slot)
            open_[s.fileno()] = (s, slot)
            sel.register(s, selectors.EVENT_READ)
        held.value = len(open_)
        for key, _ in sel.select(0.2):
            s, slot = open_[key.fd]
            try:
                if s.recv(4096):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            sel.unregister(s)
            del open_[key.fd]
            s.close()
            pending.append(slot)
    for s, _ in open_.values():
        s.close()


def _slow_headers(host: str, port: int, sources: list[str], count: int, cert: str, key: str,
                  ca: str, held: Synchronized[int], stop: Any) -> None:
    """``count`` authenticated clients sending a request head one byte per second."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(cert, key)
    head = b"GET /api/v1/keys/slave-d/status HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 500
    lock = threading.Lock()
    live = [0]

    def one(source: str) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((host, port), timeout=10,
                                              source_address=(source, 0)) as raw, \
                        ctx.wrap_socket(raw) as tls:
                    with lock:
                        live[0] += 1
                    try:
                        for i in range(len(head)):
                            if stop.wait(1.0):
                                break
                            tls.sendall(head[i:i + 1])
                    finally:
                        with lock:
                            live[0] -= 1
            except OSError:
                stop.wait(0.2)

    threads = [threading.Thread(target=one, args=(sources[i % len(sources)],), daemon=True)
               for i in range(count)]
    for t in threads:
        t.start()
    while not stop.is_set():
        held.value = live[0]
        stop.wait(0.2)
    for t in threads:
        t.join(5)


@contextlib.contextmanager
def attack(target: Callable[..., None], *args: Any, want: int) -> Iterator[Synchronized[int]]:
    ctx = mp.get_context("fork")
    held: Synchronized[int] = ctx.Value("i", 0)
    stop = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, held, stop), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while held.value < want and time.monotonic() < deadline:
            time.sleep(0.2)
        yield held
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.kill()


# -- legitimate requests -----------------------------------------------------------------------


def status_new_connection(manifest: dict[str, Any], n: int) -> tuple[int, list[float]]:
    """ETSI 014 status, each on a new TLS connection (the handshake counts)."""
    served, lat = 0, []
    for _ in range(n):
        client = SaeClient.from_manifest(manifest, "master")
        t0 = time.perf_counter()
        try:
            status, _ = client.status("slave-d")
        except (OSError, http.client.HTTPException):
            status = 0
        lat.append((time.perf_counter() - t0) * 1000)
        served += status == 200
        client.close()
    return served, lat


def status_kept_alive(client: SaeClient, n: int) -> tuple[int, list[float]]:
    served, lat = 0, []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            status, _ = client.status("slave-d")
        except (OSError, http.client.HTTPException):
            status = 0
            client.close()
        lat.append((time.perf_counter() - t0) * 1000)
        served += status == 200
    return served, lat


def enc_keys_3hop(client: SaeClient, n: int) -> tuple[int, list[float]]:
    served, lat = 0, []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            status, _ = client.enc_keys("slave-d")
        except (OSError, http.client.HTTPException):
            status = 0
            client.close()  # counted as not served; the next request reconnects
        lat.append((time.perf_counter() - t0) * 1000)
        served += status == 200
    return served, lat


def _row(rows: list[tuple[str, int, int, float, float]], what: str, n: int,
         result: tuple[int, list[float]]) -> None:
    served, lat = result
    rows.append((what, served, n, statistics.median(lat), _pct(lat, 99)))
    print(f"  {what}: {served}/{n} served, p50 {rows[-1][3]:.1f} ms, p99 {rows[-1][4]:.1f} ms",
          flush=True)


def normal_path(root: Path, name: str, n: int, code: Path | None
                ) -> list[tuple[str, int, int, float, float]]:
    """Status and 3-hop enc_keys on an idle federation (node code from ``code`` if given)."""
    old = os.environ.get("PYTHONPATH")
    if code is not None:
        os.environ["PYTHONPATH"] = str(code)
    fed = Federation(root / "topology.toml", root / name)
    rows: list[tuple[str, int, int, float, float]] = []
    try:
        manifest = fed.up(timeout=240)
        client = SaeClient.from_manifest(manifest, "master")
        enc_keys_3hop(client, 20)  # warm: TLS sessions, KEM pools
        label = f"[{name}]"
        _row(rows, f"{label} status, kept alive", n, status_kept_alive(client, n))
        _row(rows, f"{label} enc_keys 3 hops A->D", n, enc_keys_3hop(client, n))
        client.close()
    finally:
        fed.down()
        if code is not None:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
    return rows


def under_attack(root: Path, n: int) -> list[tuple[str, int, int, float, float]]:
    fed = Federation(root / "topology.toml", root / "attack")
    rows: list[tuple[str, int, int, float, float]] = []
    try:
        manifest = fed.up(timeout=240)
        p014 = int(next(k for k in manifest["kmstns"] if k["id"] == "A")["etsi014_url"]
                   .rsplit(":", 1)[1])
        p020 = int(next(k for k in manifest["kmstns"] if k["id"] == "B")["etsi020_url"]
                   .rsplit(":", 1)[1])
        intruder = next(s for s in manifest["saes"] if s["id"] == "intruder")
        sources = [f"127.0.1.{i}" for i in range(1, 101)]  # 100 addresses, 2 each
        master = SaeClient.from_manifest(manifest, "master")
        enc_keys_3hop(master, 20)
        cases: list[tuple[str, Callable[..., None], tuple[Any, ...], int, str]] = [
            ("014: 200 stalled TLS handshakes", _hold_raw,
             (HOSTS["A"], p014, sources, 200, STALL), 200, "status"),
            ("014: 200 idle TCP connections", _hold_raw,
             (HOSTS["A"], p014, sources, 200, b""), 200, "status"),
            ("014: 64 authenticated slow-header SAEs", _slow_headers,
             (HOSTS["A"], p014, sources[:16], 64, intruder["cert"], intruder["key"],
              manifest["ca"]), 64, "status"),
            ("020: 200 stalled TLS handshakes", _hold_raw,
             (HOSTS["B"], p020, sources, 200, STALL), 200, "enc"),
            ("020: 200 idle TCP connections", _hold_raw,
             (HOSTS["B"], p020, sources, 200, b""), 200, "enc"),
        ]
        for what, target, args, want, legit in cases:
            with attack(target, *args, want=want) as held:
                print(f"{what} (held: {held.value})", flush=True)
                result = (status_new_connection(manifest, n) if legit == "status"
                          else enc_keys_3hop(master, n))
                label = ("status, new connection each" if legit == "status"
                         else "enc_keys 3 hops via B's 020")
                _row(rows, f"{what} | {label} (held {held.value})", n, result)
        master.close()
    finally:
        fed.down()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--before", type=Path, default=None,
                        help="a source tree (worktree of the base commit) for the before run")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kmge-", dir="/tmp"))
    (root / "topology.toml").write_text(TOPOLOGY)
    rows: list[tuple[str, int, int, float, float]] = []
    try:
        if args.before is not None:
            print(f"normal path, node code from {args.before}:", flush=True)
            rows += normal_path(root, "before", args.requests, args.before.resolve())
        print("normal path, this tree:", flush=True)
        rows += normal_path(root, "after", args.requests, None)
        print("under attack:", flush=True)
        rows += under_attack(root, args.requests)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}} {'served':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for what, served, n, p50, p99 in rows:
        print(f"{what:<{width}} {served:>4}/{n:<4} {p50:>8.1f} {p99:>8.1f}")
    print(f"({args.requests} legitimate requests per row, one after another; hostile clients "
          "from 127.0.1.1-100, held by a separate process; every service its own process)")


if __name__ == "__main__":
    main()
