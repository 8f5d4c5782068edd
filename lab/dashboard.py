"""A live picture of a lab federation: ``kmstn dashboard --state DIR``.

A small HTTP server (standard library only, bound to loopback by default)
serves one page, ``lab/static/dashboard.html``, and the JSON it redraws from
every few seconds, ``/api/state``. Everything the page needs ships in the
package: no CDN, no external fonts or scripts.

``/api/state`` is built here from the federation's manifest (its topology
and the metrics URL of every service, written by the launcher) and a scrape
of every metrics endpoint, parsed with ``prometheus_client``'s own parser:

- nodes: health (how many of its services answered the scrape), ETSI 014
  request rate and p50 latency over the last window (from the deltas of
  ``kmstn_http_request_duration_seconds``, as Prometheus'
  ``histogram_quantile`` does it);
- links: kind, state (``kmstn_link_up`` of every node's routing: down if any
  node counts it down, which is what ``kmstn link ... down`` changes), and
  for QKD links the device pool level and measured key rate reported by the
  relays at its ends.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Dashboard", "DashboardServer", "Scrape", "histogram_quantile", "main"]

WINDOW_S = 15.0  # request rate and p50 are over about this much time
SCRAPE_TIMEOUT_S = 2.0
REQUESTS = "kmstn_http_request_duration_seconds"


@dataclass
class Scrape:
    """The samples of one metrics endpoint: name -> list of (labels, value)."""

    at: float
    ok: bool
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def values(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        return [(lb, v) for lb, v in self.samples.get(name, [])
                if all(lb.get(k) == want for k, want in match.items())]


def parse_exposition(text: str, at: float) -> Scrape:
    scrape = Scrape(at, True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            scrape.samples.setdefault(sample.name, []).append((dict(sample.labels),
                                                               float(sample.value)))
    return scrape


def _fetch(url: str) -> Scrape:
    now = time.monotonic()
    if not url.startswith("http://"):
        return Scrape(now, False)
    try:
        # Plain HTTP to a metrics listener of the lab, never a proxy.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=SCRAPE_TIMEOUT_S) as resp:
            return parse_exposition(resp.read().decode(), now)
    except (OSError, ValueError):
        return Scrape(now, False)


# Not ETSI requests: the launcher's and operators' probes.
_PROBES = frozenset({"healthz", "openapi"})


def _buckets(scrape: Scrape, api: str) -> tuple[dict[float, float], float]:
    """Cumulative bucket counts of all ETSI operations and statuses of one API, and the count."""
    buckets: dict[float, float] = {}
    for labels, value in scrape.values(f"{REQUESTS}_bucket", api=api):
        if labels.get("operation") in _PROBES:
            continue
        le = float(labels["le"])
        buckets[le] = buckets.get(le, 0.0) + value
    count = sum(v for lb, v in scrape.values(f"{REQUESTS}_count", api=api)
                if lb.get("operation") not in _PROBES)
    return buckets, count


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets (le -> count)."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    total = buckets[edges[-1]]
    rank = q * total
    lower_edge, lower_count = 0.0, 0.0
    for le in edges:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower_edge  # beyond the last finite bucket: its edge, as Prometheus
            if count == lower_count:
                return le
            return lower_edge + (le - lower_edge) * (rank - lower_count) / (count - lower_count)
        lower_edge, lower_count = le, count
    return lower_edge


class Dashboard:
    """Keeps recent scrapes of one federation and turns them into the page's state."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._history: dict[str, deque[Scrape]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scrape")

    def _manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "federation.json").read_text())
        return data

    def _scrape_all(self, urls: Mapping[str, str]) -> dict[str, Scrape]:
        names = list(urls)
        results = self._pool.map(_fetch, [urls[n] for n in names])
        return dict(zip(names, results, strict=True))

    def _remember(self, name: str, scrape: Scrape) -> Scrape | None:
        """Store a scrape; return the oldest one within the window (for deltas)."""
        with self._lock:
            hist = self._history.setdefault(name, deque())
            if scrape.ok:
                hist.append(scrape)
            while len(hist) > 2 and scrape.at - hist[1].at >= WINDOW_S:
                hist.popleft()
            return hist[0] if len(hist) >= 2 else None

    def state(self) -> dict[str, Any]:
        from kme.config import QkdLink, load_topology

        manifest = self._manifest()
        topology = load_topology(manifest["topology"])
        urls: dict[str, str] = manifest.get("metrics", {})
        scrapes = self._scrape_all(urls)
        nodes = []
        for node in (k for k in topology.kmstns.values() if k.kind == "kmstn"):
            mine = {n: s for n, s in scrapes.items() if n.split("/")[0] == node.id}
            gw = f"{node.id}/gateway014"
            rate, p50 = None, None
            if gw in scrapes:
                old = self._remember(gw, scrapes[gw])
                if old is not None and scrapes[gw].ok:
                    b1, c1 = _buckets(scrapes[gw], "etsi014")
                    b0, c0 = _buckets(old, "etsi014")
                    dt = scrapes[gw].at - old.at
                    rate = (c1 - c0) / dt if dt > 0 else None
                    delta = {le: n - b0.get(le, 0.0) for le, n in b1.items()}
                    q = histogram_quantile(0.5, delta)
                    p50 = q * 1000 if q is not None else None
            nodes.append({
                "id": node.id, "host": node.host,
                "services": len(mine), "services_up": sum(1 for s in mine.values() if s.ok),
                "request_rate_per_s": rate, "p50_latency_ms": p50,
            })
        links = []
        for link in topology.links:
            if link.kind == "site":
                continue
            views = [v for s in scrapes.values() if s.ok
                     for _, v in s.values("kmstn_link_up", link=link.id)]
            state = "unknown" if not views else "down" if min(views) < 1 else "up"
            down_at = sorted({n.split("/")[0] for n, s in scrapes.items() if s.ok and any(
                v < 1 for _, v in s.values("kmstn_link_up", link=link.id))})
            entry: dict[str, Any] = {"id": link.id, "kind": link.kind, "a": link.a,
                                     "b": link.b, "state": state, "down_at": down_at}
            if isinstance(link, QkdLink):
                entry.update(self._pool_of(link.id, (link.a, link.b), scrapes))
            links.append(entry)
        return {"name": manifest.get("name", ""), "generated": time.time(),
                "window_s": WINDOW_S, "nodes": nodes, "links": links}

    @staticmethod
    def _pool_of(link_id: str, ends: Iterable[str], scrapes: Mapping[str, Scrape]
                 ) -> dict[str, Any]:
        """Pool level and key rate of a QKD link, from the relay of its first end that has them."""
        for end in ends:
            s = scrapes.get(f"{end}/relay")
            if s is None or not s.ok:
                continue
            stored = s.values("kmstn_qkd_device_stored_keys", link=link_id)
            if not stored:
                continue
            top = s.values("kmstn_qkd_device_max_keys", link=link_id)
            rate = s.values("kmstn_qkd_device_key_rate_bits_per_second", link=link_id)
            return {"pool_keys": stored[0][1], "pool_max_keys": top[0][1] if top else None,
                    "key_rate_bps": rate[0][1] if rate else None, "reported_by": end}
        return {"pool_keys": None, "pool_max_keys": None, "key_rate_bps": None}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _page() -> bytes:
    return resources.files("lab").joinpath("static/dashboard.html").read_bytes()


class DashboardServer:
    """Serves the page and /api/state; ``port`` 0 takes an ephemeral port."""

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", port: int = 8090) -> None:
        self.dashboard = Dashboard(state_dir)
        dashboard = self.dashboard

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # the page polls every few seconds: no access log

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(200, _page(), "text/html; charset=utf-8")
                elif path == "/api/state":
                    try:
                        body = json.dumps(dashboard.state()).encode()
                    except (OSError, ValueError, KeyError) as exc:
                        self._send(503, json.dumps({"error": type(exc).__name__}).encode(),
                                   "application/json")
                        return
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"not found", "text/plain")

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="dashboard")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> DashboardServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.dashboard.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kmstn dashboard")
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    return serve(args.state, args.host, args.port)


def serve(state: Path, host: str, port: int) -> int:
    if not (state / "federation.json").exists():
        print(f"no running federation in {state} (run 'kmstn federation up' first)")
        return 1
    server = DashboardServer(state, host, port).start()
    print(f"dashboard of {state}: {server.url}  (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
