"""The ETSI 020 listener: the Flask app under cheroot, TLS 1.3 with X25519MLKEM768.

cheroot's pyOpenSSL adapter completes the handshake lazily, on the first
read in a worker thread, so the peer certificate is not known when the
connection is accepted. :class:`_PeerGateway` adds it to the WSGI environ
when the request is built (after the handshake), together with the
negotiated TLS group, which the 020 views check (gateway/etsi020/views.py).
Handshakes therefore never block the acceptor thread.

cheroot's own file objects for pyOpenSSL retry ``recv`` and ``readline``
but not ``read``: a request body still in flight made pyOpenSSL raise
WantReadError (a non-blocking socket underneath) and the request failed.
:class:`_TlsRawIO` is the raw layer of our reader and writer instead: it
waits with select() until the socket's timeout, then raises
``TimeoutError``, which the 020 views answer with 408.
"""

from __future__ import annotations

import _pyio
import io
import logging
import select
import signal
import threading
import time
from typing import Any

from cheroot import makefile, wsgi
from cheroot.ssl.pyopenssl import pyOpenSSLAdapter
from OpenSSL import SSL

from gateway.auth import PEER_CN_KEY, TLS_GROUP_KEY, TLS_VERSION_KEY
from kme.config import NodeConfig
from kme.pqtls import peer_identity, server_context

__all__ = ["REQUEST_TIMEOUT_S", "Etsi020Server"]

# How long a peer may take to send a request (and how long an idle keep-alive
# connection stays open). The relay's client drops idle connections sooner.
REQUEST_TIMEOUT_S = 15

log = logging.getLogger("kmstn.gateway.etsi020")


class _PeerGateway(wsgi.Gateway_10):
    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        # After a 408 the rest of the body is not coming: close the connection
        # rather than let cheroot wait a second timeout to drain it.
        if status.startswith("408"):
            self.req.close_connection = True
        return super().start_response(status, headers, exc_info)

    def get_environ(self) -> dict[str, Any]:  # type: ignore[override]
        env: dict[str, Any] = super().get_environ()  # type: ignore[no-untyped-call]
        conn = self.req.conn.socket
        if isinstance(conn, SSL.Connection):
            env[PEER_CN_KEY] = peer_identity(conn)
            env[TLS_GROUP_KEY] = conn.get_group_name()
            env[TLS_VERSION_KEY] = conn.get_protocol_version_name()
        return env


class _TlsRawIO(io.RawIOBase):
    """Blocking-with-timeout reads and writes on a pyOpenSSL connection."""

    def __init__(self, conn: SSL.Connection, mode: str) -> None:
        super().__init__()
        self._conn = conn
        self._mode = mode
        self._timeout = conn.gettimeout() or 30.0

    def readable(self) -> bool:
        return "r" in self._mode

    def writable(self) -> bool:
        return "w" in self._mode

    def fileno(self) -> int:
        return int(self._conn.fileno())

    def _wait(self, deadline: float, want_write: bool) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        fd = self._conn.fileno()
        if want_write:
            select.select([], [fd], [], left)
        else:
            select.select([fd], [], [], left)

    def readinto(self, buf: Any) -> int:
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                return int(self._conn.recv_into(buf))
            except SSL.WantReadError:
                self._wait(deadline, want_write=False)
            except SSL.WantWriteError:
                self._wait(deadline, want_write=True)
            except SSL.ZeroReturnError:
                return 0
            except SSL.SysCallError as exc:
                if exc.args and exc.args[0] in (-1, 0):  # unexpected EOF
                    return 0
                raise ConnectionError(str(exc)) from None
            except SSL.Error as exc:
                if _peer_went_away(exc):
                    return 0
                raise ConnectionError(str(exc)) from None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                return int(self._conn.send(view[:16384].tobytes()))
            except SSL.WantWriteError:
                self._wait(deadline, want_write=True)
            except SSL.WantReadError:
                self._wait(deadline, want_write=False)
            except SSL.SysCallError as exc:
                raise ConnectionError(str(exc)) from None


def _peer_went_away(exc: SSL.Error) -> bool:
    """A peer that vanished without close_notify (a killed process): EOF, not an error.

    OpenSSL 3 reports it as "unexpected eof while reading", or with an empty
    error queue when the connection was reset.
    """
    errors = exc.args[0] if exc.args else []
    return not errors or any("unexpected eof" in str(e).lower() for e in errors)


class _Reader(_pyio.BufferedReader):  # type: ignore[misc]
    """What cheroot expects of its request reader: bytes_read and has_data()."""

    def __init__(self, raw: _TlsRawIO, bufsize: int) -> None:
        super().__init__(raw, bufsize)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = bytes(super().read(size))
        self.bytes_read += len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        data = bytes(super().readline(size))
        self.bytes_read += len(data)
        return data

    def has_data(self) -> bool:
        return bool(len(self._read_buf) > self._read_pos)


class _Writer(makefile.BufferedWriter):
    """cheroot's writer flushes on every write; the response must not sit in a buffer."""

    def __init__(self, raw: _TlsRawIO, bufsize: int) -> None:
        super().__init__(raw, bufsize)
        self.bytes_written = 0

    def write(self, data: Any) -> int:
        n = int(super().write(data))  # type: ignore[no-untyped-call]
        self.bytes_written += n
        return n


class _Adapter(pyOpenSSLAdapter):
    def makefile(self, sock: Any, mode: str = "r", bufsize: int = -1) -> Any:
        size = bufsize if bufsize and bufsize > 0 else io.DEFAULT_BUFFER_SIZE
        raw = _TlsRawIO(sock, mode)
        return _Reader(raw, size) if "r" in mode else _Writer(raw, size)


class _Server(wsgi.Server):
    def error_log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        # Handshake failures of unauthenticated clients land here; they are
        # routine, so keep them at debug unless cheroot calls them errors.
        log.log(logging.DEBUG if level < logging.ERROR else logging.WARNING, "cheroot: %s",
                msg, exc_info=traceback)


class Etsi020Server:
    def __init__(self, config: NodeConfig, app: Any) -> None:
        node = config.node
        threads = config.gateway.threads
        self._server = _Server((node.host, node.etsi020_port), app, numthreads=threads,
                               max=threads, request_queue_size=128, timeout=REQUEST_TIMEOUT_S,
                               shutdown_timeout=10, server_name=f"kmstn-{node.id}")
        self._server.gateway = _PeerGateway
        adapter = _Adapter(str(config.tls.cert), str(config.tls.key))
        adapter.context = server_context(config.tls)
        self._server.ssl_adapter = adapter
        self.address = f"{node.host}:{node.etsi020_port}"

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
            # cheroot force-closes lingering connections with socket-style
            # shutdown(how), which pyOpenSSL connections do not take; the
            # server is stopped either way.
            log.debug("cheroot stop: lingering connections closed uncleanly", exc_info=True)
