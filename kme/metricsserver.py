"""The listener that serves a process's metrics (kme.metrics.REGISTRY) as
Prometheus text on ``GET /metrics``, and the metrics' cost benchmark
(``python -m kme.metricsserver``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import generate_latest

from kme.metrics import GRPC_HANDLED, REGISTRY, count_keyvault_keys, observe_http_request

__all__ = ["MetricsServer", "exposition", "start_metrics_server"]


def exposition() -> bytes:
    """This process's metrics in the Prometheus text format (what /metrics serves)."""
    return generate_latest(REGISTRY)


@dataclass
class MetricsServer:
    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(host: str, ports: Sequence[int], log: logging.Logger
                         ) -> MetricsServer | None:
    """Serve REGISTRY on the first of ``ports`` that is free; log the URL.

    Several ports are tried only where one service runs several processes
    (Gunicorn workers of the 014 gateway: each its own registry and port).
    Returns None, with an error logged, when none can be bound: metrics are
    an aid, and a node must not stop serving keys for want of them.
    """
    from prometheus_client import start_http_server

    last: OSError | None = None
    for port in ports:
        try:
            server, thread = start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as exc:
            last = exc
            continue
        bound = MetricsServer(host, int(server.server_port), server, thread)
        log.info("metrics listening", extra={"metrics_url": bound.url})
        return bound
    log.error("cannot start the metrics listener", extra={
        "host": host, "ports": list(ports), "error": last.strerror if last else "no port"})
    return None


def _bench() -> None:
    """``python -m kme.metricsserver``: import cost and per-observation cost, printed."""
    import statistics
    import subprocess
    import sys

    for before, what in (("", "alone"), ("import grpc, flask; ", "after grpc and flask")):
        code = (f"{before}import time; t=time.perf_counter(); import prometheus_client; "
                "print(time.perf_counter()-t)")
        imports = sorted(float(subprocess.run(  # noqa: S603 - our own interpreter
            [sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
            for _ in range(7))
        print(f"import prometheus_client {what}: median "
              f"{statistics.median(imports) * 1000:.1f} ms (7 fresh interpreters)")
    n = 100_000

    def per_call(fn: Callable[[], None]) -> float:
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t) / n)
        return statistics.median(runs) * 1e6

    cases: list[tuple[str, Callable[[], None]]] = [
        ("observe_http_request (counter + histogram, labels)",
         lambda: observe_http_request("etsi014", "enc_keys", 200, 0.004)),
        ("GRPC_HANDLED.labels(...).inc()",
         lambda: GRPC_HANDLED.labels("kme.rpc.v1.KeyVault", "Store", "OK").inc()),
        ("count_keyvault_keys", lambda: count_keyvault_keys("stored", 1)),
    ]
    for name, fn in cases:
        print(f"{name}: median {per_call(fn):.2f} us per call ({n} calls x 5)")
    t = time.perf_counter()
    for _ in range(100):
        exposition()
    print(f"exposition of this registry: {(time.perf_counter() - t) * 10:.2f} ms per scrape")


if __name__ == "__main__":
    _bench()
