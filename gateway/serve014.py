"""The ETSI 014 listener: the Flask app under Gunicorn with mutual TLS 1.2+.

Gunicorn keeps its arbiter (worker processes, signals, graceful restarts)
and its HTTP/1.1 request parser and response writer; what a gthread worker
did in its main thread and pool threads is split differently, because that
worker did the TLS handshake and read the request head inside a pool thread
with no deadline (33 stalled handshakes stopped a node, issue 16):

- :class:`EdgeWorker` (a ThreadWorker) runs the edge's front loop
  (gateway/edge.py) in its main thread: non-blocking TLS handshakes with
  Python's ssl, the whole request read and framed in memory under the
  handshake, header and body deadlines, caps per source and in total.
- Its thread pool only ever gets a complete request: Gunicorn's parser reads
  it from memory, the Flask app runs, Gunicorn's writer answers on the TLS
  socket (blocking, with a send timeout). Keep-alive connections go back to
  the loop to wait for their next request.
- Gunicorn's own refusals and log lines go the same ways as everything else:
  an ETSI 400 with the Error body, JSON log lines, and no ``Server`` banner.

The app and its gRPC channels are built in each worker after the fork (gRPC
channels do not survive a fork). The TLS context is built once per worker.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.http import errors as http_errors
from gunicorn.http import wsgi as gwsgi
from gunicorn.http.parser import RequestParser
from gunicorn.workers.gthread import ThreadWorker

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


class _QuietResponse(gwsgi.Response):  # type: ignore[misc]
    """Gunicorn's response writer without its ``Server: gunicorn`` banner."""

    def default_headers(self) -> list[str]:
        return [h for h in super().default_headers() if not h.lower().startswith("server:")]


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
        parser = RequestParser(self.cfg, [request.wire], conn.peer)
        try:
            req = next(parser)
            resp, environ = gwsgi.create(req, conn.tls, conn.peer, conn.tls.getsockname(),
                                         self.cfg, response_class=_QuietResponse)
        except StopIteration:
            return False
        except (http_errors.ParseException, http_errors.NoMoreData) as exc:
            # The edge refuses everything Gunicorn's parser would; should
            # they ever disagree, the client still gets an ETSI 400.
            self._refuse(conn, request.method, str(exc)[:200])
            return False
        environ["wsgi.multithread"] = True
        if not self.alive:
            resp.force_close()
        result = self.wsgi(environ, resp.start_response)
        try:
            for chunk in result:
                resp.write(chunk)
            resp.close()
        finally:
            if hasattr(result, "close"):
                result.close()
        return not resp.should_close() and bool(self.alive)

    def _refuse(self, conn: EdgeConn, method: str, reason: str) -> None:
        request_id = str(uuid.uuid4())
        self.edge_counters.add("refused_request")
        log.warning("request refused", extra={"listener": "etsi014", "peer": conn.source,
                                               "reason": reason, "request_id": request_id})
        with contextlib.suppress(OSError, ssl.SSLError):
            conn.tls.sendall(_render("etsi014", Refused("malformed request"), method,
                                     request_id))


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
