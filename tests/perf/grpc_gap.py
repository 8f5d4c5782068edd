"""What a pause between calls costs an internal gRPC call (a development benchmark).

    python tests/perf/grpc_gap.py [--calls 500]

Starts a gRPC server (the standard health service, a thread pool of 8, as
the node's services use) in a second process on a unix socket, and times
one unary call from this process back to back, then with a 5 ms sleep
between calls, then with 5 ms of busy waiting between calls. For scale it
times a one-byte round trip over a socketpair between two processes, back
to back and with 5 ms between. It prints the median of each. A stocked Get
key crosses two such calls (014 gateway -> relay at the master, 014 gateway
-> keyvault at the slave), each after the node sat idle for a few ms.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

GAP_S = 0.005


def serve(path: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port("unix:" + path)
    server.start()
    server.wait_for_termination()


def _median_ms(call: Callable[[], object], calls: int, pause: Callable[[], None] | None) -> float:
    for _ in range(100):
        call()
    times = []
    for _ in range(calls):
        if pause is not None:
            pause()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _spin() -> None:
    end = time.perf_counter() + GAP_S
    while time.perf_counter() < end:
        pass


def _socketpair(calls: int, gap: float) -> float:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echoing child
        a.close()
        while data := b.recv(1):
            b.send(data)
        os._exit(0)
    b.close()

    def ping() -> None:
        a.send(b"x")
        a.recv(1)

    try:
        return _median_ms(ping, calls, (lambda: time.sleep(gap)) if gap else None)
    finally:
        a.close()
        os.waitpid(pid, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "gap.sock")
        server = subprocess.Popen([sys.executable, __file__, "--serve", path])
        try:
            channel = grpc.insecure_channel("unix:" + path)
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = health_pb2_grpc.HealthStub(channel)
            req = health_pb2.HealthCheckRequest()

            def check() -> None:
                stub.Check(req, timeout=5)

            rows = [
                ("gRPC unary call, back to back", _median_ms(check, args.calls, None)),
                (f"gRPC unary call, {GAP_S * 1000:.0f} ms sleep between calls",
                 _median_ms(check, args.calls, lambda: time.sleep(GAP_S))),
                (f"gRPC unary call, {GAP_S * 1000:.0f} ms busy wait between calls",
                 _median_ms(check, args.calls, _spin)),
            ]
            channel.close()
        finally:
            server.terminate()
            server.wait(timeout=10)
    rows += [("socketpair round trip, back to back", _socketpair(args.calls, 0.0)),
             (f"socketpair round trip, {GAP_S * 1000:.0f} ms between",
              _socketpair(args.calls, GAP_S))]
    for name, ms in rows:
        print(f"{name:<48} p50 {ms:7.3f} ms")


if __name__ == "__main__":
    main()
