"""TLS 1.3 with the hybrid post-quantum group X25519MLKEM768, for the ETSI 020 edge.

Python's own ``ssl`` module links the system OpenSSL 3.0, which has no ML-KEM
groups. pyOpenSSL uses the OpenSSL that ``cryptography`` bundles (4.x), which
negotiates ``X25519MLKEM768``; so everything that speaks ETSI 020 between
nodes goes through this module: the server contexts of the 020 listener
(cheroot) and :class:`PeerHttpClient`, a small keep-alive HTTP/1.1 client
used by the relay to reach a neighbour's 020 endpoint.

Policy (ETSI GS QKD 020 V1.1.1 clause 2: TLS 1.3 or higher, mutual TLS):

- TLS 1.3 only, both directions; a peer certificate is required and must
  chain to our CA.
- kmstn-to-kmstn connections offer only ``X25519MLKEM768``; the server
  prefers it and the gateway refuses a kmstn peer that negotiated anything
  else. A foreign KMS in the same protected site (a site link) may still use
  a classical group, because plain ETSI 020 V1.1.1 peers need not support
  ML-KEM; the server list is ``X25519MLKEM768:X25519:P-256`` for them.
- The peer's identity is the subject CN of its certificate (kmstn's rule).

pyOpenSSL does not expose ``SSL_CTX_set1_groups_list``; its binding
``SSL_CTX_set1_curves_list`` is the same OpenSSL call (curves is the old
name of groups), reached through ``OpenSSL._util``. A unit test pins that
the negotiated group really is X25519MLKEM768.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import lib as _ssl_lib

from kme.config import TlsFiles
from kme.errors import ErrorCode, KmstnError

__all__ = [
    "PQ_GROUP",
    "HttpResponse",
    "PeerHttpClient",
    "client_context",
    "peer_identity",
    "server_context",
]

PQ_GROUP = "X25519MLKEM768"
SERVER_GROUPS = (PQ_GROUP, "X25519", "P-256")
CLIENT_GROUPS = (PQ_GROUP,)


def _set_groups(ctx: SSL.Context, groups: tuple[str, ...]) -> None:
    if _ssl_lib.SSL_CTX_set1_curves_list(ctx._context, ":".join(groups).encode()) != 1:
        raise RuntimeError(f"OpenSSL refused the TLS group list {groups}")


def _base_context(tls: TlsFiles, groups: tuple[str, ...]) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(str(tls.cert))
    ctx.use_privatekey_file(str(tls.key))
    ctx.check_privatekey()
    ctx.load_verify_locations(str(tls.ca))
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    # No session tickets: every connection is a full handshake with a fresh
    # hybrid key exchange, and the server keeps no ticket key to steal.
    ctx.set_options(SSL.OP_NO_TICKET)
    _set_groups(ctx, groups)
    return ctx


def server_context(tls: TlsFiles, groups: tuple[str, ...] = SERVER_GROUPS) -> SSL.Context:
    return _base_context(tls, groups)


def client_context(tls: TlsFiles, groups: tuple[str, ...] = CLIENT_GROUPS) -> SSL.Context:
    return _base_context(tls, groups)


def peer_identity(conn: SSL.Connection) -> str | None:
    """The subject CN of the verified peer certificate, or None."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else None


def cert_identity(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if len(names) == 1 else None
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    tls_group: str


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise KmstnError(ErrorCode.TIMEOUT, "peer did not answer in time")
        return remaining


class _Connection:
    """One TLS connection; pyOpenSSL on a non-blocking socket, driven by select."""

    def __init__(self, host: str, port: int, ctx: SSL.Context, expected_peer: str,
                 deadline: _Deadline) -> None:
        sock = socket.create_connection((host, port), timeout=deadline.left())
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self.ssl = SSL.Connection(ctx, sock)
        self.ssl.set_connect_state()
        self._buf = b""
        self.last_used = time.monotonic()
        self.reused = False
        self._io(self.ssl.do_handshake, deadline)
        who = peer_identity(self.ssl)
        if who != expected_peer:
            self.close()
            raise KmstnError(ErrorCode.UNAUTHENTICATED, "peer presented another identity",
                             cause=f"expected {expected_peer!r}, certificate CN {who!r}")
        self.group = self.ssl.get_group_name() or ""

    def _io(self, fn, deadline: _Deadline, *args):  # type: ignore[no-untyped-def]
        while True:
            try:
                return fn(*args)
            except SSL.WantReadError:
                select.select([self.sock], [], [], deadline.left())
            except SSL.WantWriteError:
                select.select([], [self.sock], [], deadline.left())

    def send(self, data: bytes, deadline: _Deadline) -> None:
        view = memoryview(data)
        while view:
            sent = self._io(self.ssl.send, deadline, view[:65536].tobytes())
            view = view[sent:]

    def _fill(self, deadline: _Deadline) -> bool:
        try:
            chunk = self._io(self.ssl.recv, deadline, 65536)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return False
        if not chunk:
            return False
        self._buf += chunk
        return True

    def read_response(self, deadline: _Deadline) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self._buf:
            if not self._fill(deadline):
                raise ConnectionError("connection closed before the response headers")
            if len(self._buf) > 65536:
                raise ConnectionError("response headers too large")
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = head.decode("iso-8859-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError("malformed status line")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunked(deadline)
        elif "content-length" in headers:
            body = self._read_exact(int(headers["content-length"]), deadline)
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:
            while self._fill(deadline):
                pass
            body, self._buf = self._buf, b""
            headers["connection"] = "close"
        return status, headers, body

    def _read_exact(self, n: int, deadline: _Deadline) -> bytes:
        while len(self._buf) < n:
            if not self._fill(deadline):
                raise ConnectionError("connection closed in the middle of the body")
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _read_line(self, deadline: _Deadline) -> bytes:
        while b"\r\n" not in self._buf:
            if not self._fill(deadline):
                raise ConnectionError("connection closed in a chunked body")
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def _read_chunked(self, deadline: _Deadline) -> bytes:
        out = bytearray()
        while True:
            size = int(self._read_line(deadline).split(b";")[0], 16)
            if size == 0:
                while self._read_line(deadline):  # trailers
                    pass
                return bytes(out)
            out += self._read_exact(size, deadline)
            self._read_line(deadline)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ssl.shutdown()
        with contextlib.suppress(OSError):
            self.sock.close()


class PeerHttpClient:
    """HTTP/1.1 over TLS 1.3 (X25519MLKEM768) to neighbour 020 endpoints, with keep-alive.

    Connections are pooled per (host, port, expected identity). A request on
    a reused connection that fails before any byte of the answer arrived is
    retried once on a new connection: the server closed an idle connection,
    and ETSI 020 ext_keys, void and ack are safe to resend (the receiver
    treats an identical resend as the same request).
    """

    def __init__(self, tls: TlsFiles, groups: tuple[str, ...] = CLIENT_GROUPS,
                 max_idle: int = 8, idle_seconds: float = 10.0) -> None:
        self._ctx = client_context(tls, groups)
        self._pools: dict[tuple[str, int, str], deque[_Connection]] = {}
        self._lock = threading.Lock()
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds

    def _checkout(self, key: tuple[str, int, str], deadline: _Deadline) -> _Connection:
        now = time.monotonic()
        with self._lock:
            pool = self._pools.setdefault(key, deque())
            while pool:
                conn = pool.pop()
                if now - conn.last_used < self._idle_seconds:
                    conn.reused = True
                    return conn
                conn.close()
        return _Connection(key[0], key[1], self._ctx, key[2], deadline)

    def _checkin(self, key: tuple[str, int, str], conn: _Connection) -> None:
        conn.last_used = time.monotonic()
        with self._lock:
            pool = self._pools.setdefault(key, deque())
            if len(pool) < self._max_idle:
                pool.append(conn)
                return
        conn.close()

    def request(self, method: str, url: str, expected_peer: str, body: bytes = b"",
                headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> HttpResponse:
        """Send one request and return the answer; transport failures raise KmstnError."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, f"not an https URL: {url!r}")
        host, port = parts.hostname, parts.port or 443
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        hdrs = {"Host": parts.netloc, "Content-Length": str(len(body)),
                "Connection": "keep-alive", **(headers or {})}
        wire = (f"{method} {target} HTTP/1.1\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n").encode() + body
        deadline = _Deadline(timeout)
        key = (host, port, expected_peer)
        for attempt in (1, 2):
            try:
                conn = self._checkout(key, deadline)
            except KmstnError:
                raise
            except (OSError, SSL.Error) as exc:
                raise KmstnError(ErrorCode.UNAVAILABLE, "peer unreachable",
                                 cause=f"{host}:{port}: {exc!r}") from None
            started = False
            try:
                conn.send(wire, deadline)
                started = True
                status, resp_headers, resp_body = conn.read_response(deadline)
            except KmstnError:
                conn.close()
                raise
            except (OSError, SSL.Error, ConnectionError, ValueError) as exc:
                conn.close()
                stale = conn.reused and not conn._buf and isinstance(
                    exc, (ConnectionError, SSL.Error, OSError))
                if attempt == 1 and stale:
                    continue
                # Sent but unanswered: the peer may still be acting on it.
                raise KmstnError(ErrorCode.UNAVAILABLE, "peer connection failed",
                                 cause=f"{host}:{port} sent={started}: {exc!r}",
                                 reason="in_doubt" if started else None) from None
            if resp_headers.get("connection", "").lower() == "close":
                conn.close()
            else:
                self._checkin(key, conn)
            return HttpResponse(status, resp_headers, resp_body, conn.group)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()
