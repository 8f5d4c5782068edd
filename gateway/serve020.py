"""The ETSI 020 listener: the Flask app under cheroot, TLS 1.3 with X25519MLKEM768.

cheroot keeps its worker pool, its request parser and its WSGI gateway; its
connection manager (the selector thread that accepted connections and
watched keep-alive ones) is replaced by the edge's front loop
(gateway/edge.py), because cheroot let pyOpenSSL handshake lazily in a
worker thread, where 40 idle TCP connections held all 32 threads for up to
30 s each (issue 16). Now:

- the front loop accepts, handshakes with pyOpenSSL non-blocking (TLS 1.3
  only, X25519MLKEM768 preferred, kme/pqtls.py), and reads each request
  whole under the handshake, header and body deadlines and the connection
  caps;
- a worker gets a complete request in memory (:class:`_EdgeHttpConnection`
  reads it from a byte buffer, never from the network) and writes the
  answer on the TLS connection with a send timeout (:class:`_TlsWriter`);
- cheroot's own refusals answer RFC 9457 problem details like everything
  else (:class:`_EdgeRequest`), and no ``Server`` banner is sent.

The peer certificate and the negotiated TLS group go into the WSGI environ
(:class:`_PeerGateway`), where gateway/auth.py and the 020 views read them.
"""

from __future__ import annotations

import email.utils
import io
import logging
import select
import signal
import threading
import time
import uuid
from typing import Any

from cheroot import makefile, server, wsgi
from OpenSSL import SSL

from gateway.auth import PEER_CERT_KEY, TLS_GROUP_KEY, TLS_VERSION_KEY
from gateway.edge import (
    EdgeConn,
    EdgeCounters,
    EdgeSettings,
    FrontLoop,
    authority_matcher,
)
from gateway.edgetls_openssl import PyOpenSslTls
from gateway.errors import RefusalKind, refusal_response
from gateway.http1 import Limits, Request
from kme import metrics
from kme.config import NodeConfig
from kme.pqtls import server_context

__all__ = ["Etsi020Server"]

log = logging.getLogger("kmstn.gateway.etsi020")


class _PeerGateway(wsgi.Gateway_10):
    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        # After a 408 the rest of the body is not coming: close the connection.
        if status.startswith("408"):
            self.req.close_connection = True
        return super().start_response(status, headers, exc_info)

    def get_environ(self) -> dict[str, Any]:  # type: ignore[override]
        env: dict[str, Any] = super().get_environ()  # type: ignore[no-untyped-call]
        conn = self.req.conn.socket
        if isinstance(conn, SSL.Connection):
            env[PEER_CERT_KEY] = conn.get_peer_certificate(as_cryptography=True)
            env[TLS_GROUP_KEY] = conn.get_group_name()
            env[TLS_VERSION_KEY] = conn.get_protocol_version_name()
        return env


class _TlsWriter(io.RawIOBase):
    """Writes on a pyOpenSSL connection over a non-blocking socket, within a timeout."""

    def __init__(self, conn: SSL.Connection, timeout: float) -> None:
        super().__init__()
        self._conn = conn
        self._timeout = timeout

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return int(self._conn.fileno())

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                return int(self._conn.send(view[:16384].tobytes()))
            except (SSL.WantWriteError, SSL.WantReadError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the client does not read its answer") from None
                fd = self._conn.fileno()
                if isinstance(exc, SSL.WantWriteError):
                    select.select([], [fd], [], left)
                else:
                    select.select([fd], [], [], left)
            except SSL.Error as exc:
                raise ConnectionError(repr(exc)) from None


class _Writer(makefile.BufferedWriter):
    """cheroot's writer flushes on every write; the answer must not sit in a buffer."""

    def __init__(self, raw: _TlsWriter, bufsize: int) -> None:
        super().__init__(raw, bufsize)
        self.bytes_written = 0

    def write(self, data: Any) -> int:
        n = int(super().write(data))  # type: ignore[no-untyped-call]
        self.bytes_written += n
        return n


class _RequestBytes(io.BytesIO):
    """One complete request, read by cheroot as if from the socket."""

    @property
    def bytes_read(self) -> int:
        return self.tell()

    def has_data(self) -> bool:
        return self.tell() < len(self.getbuffer())


class _EdgeRequest(server.HTTPRequest):
    """cheroot's request with kmstn's refusals and headers (no ``Server`` banner)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scheme = b"https"  # TLS is done by the edge, not a cheroot ssl_adapter

    def simple_response(self, status: Any, msg: str = "") -> None:
        # The edge refuses what cheroot's parser would, so this is a second
        # line of defence; it answers problem details all the same.
        code = int(str(status)[:3])
        request_id = str(uuid.uuid4())
        kind: RefusalKind = "timeout" if code == 408 else "server" if code >= 500 else "bad"
        message = msg or str(status)[4:] or "bad request"
        (log.warning if kind != "server" else log.error)(
            "request refused", extra={"listener": "etsi020", "reason": message[:200],
                                      "peer": self.conn.remote_addr, "status": code,
                                      "request_id": request_id})
        method = self.method.decode("ascii", "replace") if getattr(self, "method", None) \
            else "GET"
        self.close_connection = True
        body = refusal_response("etsi020", message[:200], kind, method, request_id)
        try:
            self.conn.wfile.write(body)
        except OSError:
            pass

    def send_headers(self) -> None:
        names = {k.lower() for k, _ in self.outheaders}
        code = int(self.status[:3])
        if b"content-length" not in names and code >= 200 and code not in (204, 304):
            if self.response_protocol == "HTTP/1.1" and self.method != b"HEAD":
                self.chunked_write = True
                self.outheaders.append((b"Transfer-Encoding", b"chunked"))
            else:
                self.close_connection = True  # the end of the body is the end of the stream
        remaining = getattr(self.rfile, "remaining", 0)
        if remaining:
            self.rfile.read(remaining)  # from memory: the request is buffered whole
        if b"connection" not in names:
            if self.response_protocol == "HTTP/1.1" and self.close_connection:
                self.outheaders.append((b"Connection", b"close"))
            elif self.response_protocol != "HTTP/1.1" and not self.close_connection:
                self.outheaders.append((b"Connection", b"Keep-Alive"))
        if b"date" not in names:
            self.outheaders.append((b"Date", email.utils.formatdate(usegmt=True).encode()))
        lines = [self.server.protocol.encode("ascii") + b" " + self.status]
        lines += [k + b": " + v for k, v in self.outheaders]
        self.conn.wfile.write(b"\r\n".join(lines) + b"\r\n\r\n")


class _EdgeHttpConnection(server.HTTPConnection):
    """A connection owned by the front loop; a worker reads its request from memory."""

    RequestHandlerClass = _EdgeRequest

    def __init__(self, srv: Any, edge: EdgeConn, loop: FrontLoop, send_timeout: float
                 ) -> None:
        def files(sock: Any, mode: str = "r", bufsize: int = -1) -> Any:
            if "w" in mode:
                return _Writer(_TlsWriter(sock, send_timeout), io.DEFAULT_BUFFER_SIZE)
            return _RequestBytes()

        super().__init__(srv, edge.tls, makefile=files)
        self.edge = edge
        self._loop = loop
        self.remote_addr, self.remote_port = edge.peer[0], edge.peer[1]
        self.ssl_env = {}

    def load(self, request: Request) -> None:
        self.rfile = _RequestBytes(request.wire)

    def close(self) -> None:
        # The loop closes the socket; a worker only says it is done with it.
        self._loop.resume(self.edge, keep_alive=False)


class _EdgeConnections:
    """Stands in for cheroot's ConnectionManager: the front loop runs in serve()'s thread."""

    def __init__(self, srv: _Server, loop: FrontLoop) -> None:
        self._server = srv
        self._loop = loop
        self._stop = False
        self._done = threading.Event()

    def run(self, expiration_interval: float) -> None:
        del expiration_interval
        self._done.clear()
        try:
            self._loop.run(lambda: not self._stop, drain_timeout=self._server.shutdown_timeout)
        finally:
            self._done.set()

    def stop(self) -> None:
        self._stop = True
        self._loop.wake()
        self._done.wait(self._server.shutdown_timeout + 5)

    def put(self, conn: _EdgeHttpConnection) -> None:
        self._loop.resume(conn.edge, keep_alive=True)

    def close(self) -> None:
        if self._done.is_set():
            return
        self._loop.close_all()

    @property
    def can_add_keepalive_connection(self) -> bool:
        return True  # the edge caps idle connections itself

    @property
    def _num_connections(self) -> int:
        return self._loop.busy


class _Server(wsgi.Server):
    def __init__(self, config: NodeConfig, app: Any) -> None:
        node = config.node
        threads = config.gateway.threads
        super().__init__((node.host, node.etsi020_port), app, numthreads=threads, max=threads,
                         request_queue_size=128, shutdown_timeout=10)
        self.gateway = _PeerGateway
        self.edge_counters = EdgeCounters()
        counters = self.edge_counters
        metrics.register_edge_counters(counters.snapshot, lambda: dict(counters.gauges))
        self._settings = EdgeSettings.from_config(config.gateway)
        self._tls = PyOpenSslTls(server_context(config.tls))
        self._authority = authority_matcher(node.host, node.etsi020_port)

    def prepare(self) -> None:
        super().prepare()
        replaced: Any = getattr(self, "_connections")  # noqa: B009 - set by cheroot
        self._loop = loop = FrontLoop(
            name="etsi020", listeners=[self.socket], tls=self._tls, settings=self._settings,
            limits=Limits(), accept_authority=self._authority, render=self._render,
            dispatch=self._dispatch, counters=self.edge_counters, log=log)
        self._connections = _EdgeConnections(self, loop)
        replaced.close()  # cheroot's manager: it holds nothing yet

    @staticmethod
    def _render(refusal: Any, method: str, request_id: str) -> bytes:
        kind: RefusalKind = "timeout" if refusal.timeout else "bad"
        return refusal_response("etsi020", refusal.message, kind, method, request_id)

    def _dispatch(self, edge: EdgeConn, request: Request) -> None:
        conn = edge.handle
        if conn is None:
            conn = edge.handle = _EdgeHttpConnection(self, edge, self._loop,
                                                     self._settings.send_timeout)
        conn.load(request)
        self.process_conn(conn)

    def error_log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        # cheroot's notes on lost clients are routine: debug unless it calls them
        # errors, which are logged with their traceback (a bug of ours or cheroot's).
        log.log(logging.DEBUG if level < logging.ERROR else logging.ERROR, "cheroot: %s",
                msg, exc_info=traceback and level >= logging.ERROR)


class Etsi020Server:
    def __init__(self, config: NodeConfig, app: Any) -> None:
        self._server = _Server(config, app)
        self.address = f"{config.node.host}:{config.node.etsi020_port}"

    @property
    def edge_counters(self) -> EdgeCounters:
        return self._server.edge_counters

    def serve_until_signal(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self._server.prepare()
        log.info("listening", extra={"address": self.address})
        self._server.serve()

    def stop(self) -> None:
        try:
            self._server.stop()
        except Exception:
            # A worker still writing when the pool stops may leave its socket
            # closed under it; the server is stopped either way.
            log.debug("cheroot stop: lingering connections closed uncleanly", exc_info=True)
