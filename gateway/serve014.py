"""The ETSI 014 listener: the Flask app under Gunicorn with mutual TLS 1.2+.

Gunicorn keeps its arbiter (worker processes, signals, graceful restarts);
what a gthread worker did in its main thread and pool threads is split
differently, because that worker did the TLS handshake and read the request
head inside a pool thread with no deadline (33 stalled handshakes stopped a
node, issue 16):

- :class:`EdgeWorker` (a ThreadWorker) runs the edge's front loop
  (gateway/edge.py) in its main thread: non-blocking TLS handshakes with
  Python's ssl, the whole request read and framed in memory under the
  handshake, header and body deadlines, caps per source and in total.
- Its thread pool only ever gets a complete, checked request: its WSGI
  environ is built from the edge's own parse (gateway/wsgi.py; no second
  parse), the Flask app runs, and the whole answer goes out in one write on
  the TLS socket (blocking, with a send timeout), with no ``Server`` banner.
  Keep-alive connections go back to the loop to wait for their next request.
- Gunicorn's log lines go the same way as everything else: JSON log lines.

The app and its gRPC channels are built in each worker after the fork (gRPC
channels do not survive a fork). The TLS context is built once per worker.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from gateway import wsgi
from gateway.edge import (
    EdgeConn,
    EdgeCounters,
    EdgeSettings,
    FrontLoop,
    StdlibTls,
    authority_matcher,
)
from gateway.errors import refusal_response
from gateway.http1 import Limits, Refused, Request
from kme import metrics
from kme.config import NodeConfig

__all__ = ["EdgeWorker", "Etsi014Server", "tls_context"]

log = logging.getLogger("kmstn.gateway.etsi014")


def tls_context(config: NodeConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # ETSI 014 clause 2: TLS 1.2 or higher
    ctx.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    ctx.load_verify_locations(str(config.tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _JsonLogger(glogging.Logger):  # type: ignore[misc]
    """Gunicorn's error and access logs through the process's JSON handler (kme.log)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True


class EdgeWorker(ThreadWorker):  # type: ignore[misc]
    """A gthread worker whose main thread is the edge's front loop (see the module doc)."""

    node_config: ClassVar[NodeConfig]
    limits: ClassVar[Limits] = Limits()

    def init_process(self) -> None:
        self.edge_counters = EdgeCounters()
        counters = self.edge_counters
        metrics.register_edge_counters(counters.snapshot, lambda: dict(counters.gauges))
        self._tls = StdlibTls(tls_context(self.node_config))
        self._loop: FrontLoop | None = None
        super().init_process()

    def run(self) -> None:
        c = self.node_config
        self._loop = loop = FrontLoop(
            name="etsi014", listeners=self.sockets, tls=self._tls,
            settings=EdgeSettings.from_config(c.gateway), limits=self.limits,
            accept_authority=authority_matcher(c.node.host, c.node.etsi014_port),
            render=partial(_render, "etsi014"), dispatch=self._dispatch,
            counters=self.edge_counters, log=log)
        loop.watch(self.PIPE[0])  # Gunicorn's signal wake-up pipe
        last_notify = 0.0

        def tick() -> None:
            nonlocal last_notify
            now = time.monotonic()
            if now - last_notify >= 1.0:
                self.notify()  # tells the arbiter this worker is alive
                last_notify = now
                if not self.is_parent_alive():
                    self.alive = False

        # Finish within the arbiter's graceful timeout, before it kills us.
        loop.run(lambda: bool(self.alive), tick,
                 drain_timeout=max(1.0, self.cfg.graceful_timeout - 2.0))
        self.tpool.shutdown(wait=False)
        for listener in self.sockets:
            listener.close()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.alive = False
        if self._loop is not None:
            self._loop.wake()

    def _dispatch(self, conn: EdgeConn, request: Request) -> None:
        self.tpool.submit(self._serve, conn, request)

    def _serve(self, conn: EdgeConn, request: Request) -> None:
        """In a pool thread: answer one complete request; never reads the network."""
        keep = False
        loop = self._loop
        try:
            keep = self._answer(conn, request)
        except (OSError, ssl.SSLError):
            keep = False  # the client went away while we answered
        except Exception:
            log.exception("request failed in the server")
        finally:
            if loop is not None:
                loop.resume(conn, keep)

    def _answer(self, conn: EdgeConn, request: Request) -> bool:
        """Run the app on the checked request; the whole answer goes out in one write."""
        if conn.handle is None:  # this connection's local address, asked for once
            conn.handle = conn.tls.getsockname()
        environ = wsgi.environ_for(request, conn.tls, conn.peer, conn.handle,
                                   multiprocess=self.cfg.workers > 1)
        answer = wsgi.Answer(request.version)
        result = self.wsgi(environ, answer.start_response)
        try:
            for chunk in result:
                answer.write(chunk)
        finally:
            if hasattr(result, "close"):
                result.close()
        # Decided once the app is done: a worker told to stop meanwhile says close.
        keep_alive = bool(self.alive) and not request.close
        conn.tls.sendall(answer.render(keep_alive))
        return keep_alive


def _render(api: str, refusal: Refused, method: str, request_id: str) -> bytes:
    return refusal_response(api, refusal.message, "timeout" if refusal.timeout else "bad",
                            method, request_id)


def worker_for(config: NodeConfig) -> type[EdgeWorker]:
    """EdgeWorker bound to this node's configuration (inherited by the forked workers)."""
    return type("EdgeWorker014", (EdgeWorker,), {"node_config": config})


class Etsi014Server(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: NodeConfig, load_app: Callable[[], Any],
                 on_exit: Callable[[], None] = lambda: None) -> None:
        self._node_config = config
        self._load_app = load_app
        self._on_exit = on_exit
        super().__init__()

    def load_config(self) -> None:
        c = self._node_config
        settings: dict[str, Any] = {
            "bind": [f"{c.node.host}:{c.node.etsi014_port}"],
            "workers": c.gateway.workers,
            "worker_class": worker_for(c),
            "threads": c.gateway.threads,
            "timeout": 60,
            "graceful_timeout": 10,
            # The worker does TLS itself (EdgeWorker); these tell Gunicorn the
            # scheme is https.
            "certfile": str(c.tls.cert),
            "keyfile": str(c.tls.key),
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
            "logger_class": _JsonLogger,
            "proc_name": f"kmstn-gateway014-{c.node_id}",
            "reuse_port": False,
            "preload_app": False,
            # The arbiter leaves through sys.exit; this runs just before.
            "on_exit": lambda _arbiter: self._on_exit(),
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._load_app()
