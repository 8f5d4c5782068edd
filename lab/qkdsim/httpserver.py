"""A small HTTP/1.1 server over mutual TLS on asyncio, just enough for ETSI 014.

Why not a framework: the emulator must sustain well over a thousand
requests per second on one core with keep-alive TLS connections. Each
connection here is an :class:`asyncio.Protocol`: bytes arrive in
``data_received``, a complete request is handed to a synchronous handler,
and the answer is written back at once. No coroutine per request, no
thread hand-off, no WSGI layer, no per-request TLS handshake. The handler
touches only memory, so the loop never waits on anything but sockets and no
lock exists to be held across I/O (the key store needs none: one thread
owns it).

Timeouts and limits: the TLS handshake must finish within
``request_timeout``; a sweeper checks every connection once a second and
closes one whose started request has not fully arrived within
``request_timeout`` or that has been idle for ``idle_timeout`` (so every
read has a deadline without a timer per request). Request heads are at
most 16 KiB, bodies at most ``max_body`` bytes (Content-Length or chunked),
at most ``max_connections`` connections are served at once, and a client
that stops reading its answers stops being read (write-buffer back
pressure). Malformed requests get a 400 with an ETSI Error body and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["HttpsListener", "Request", "Response", "caller_cn"]

MAX_HEADER: Final = 16 * 1024
_REASONS: Final = {200: "OK", 400: "Bad Request", 401: "Unauthorized",
                   503: "Service Unavailable"}
_SWEEP_INTERVAL: Final = 1.0
_LINGER: Final = 0.5


@dataclass(slots=True)
class Request:
    method: str
    path: str  # raw (still percent-encoded), without the query
    query: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    close: bool = False
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request, "str | None"], Response]


class _BadRequestError(Exception):
    pass


def caller_cn(peercert: Any) -> str | None:
    """The subject CN of a verified peer certificate (``getpeercert()`` form), if exactly one."""
    if not isinstance(peercert, dict):
        return None
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    return names[0] if len(names) == 1 and names[0] else None


def error_response(status: int, message: str, close: bool = False) -> Response:
    body = json.dumps({"message": message}, separators=(",", ":")).encode()
    return Response(status, body, close)


@dataclass(slots=True)
class _Head:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    keep_alive: bool
    length: int | None  # Content-Length, or None for chunked


def _parse_head(head: bytes, max_body: int) -> _Head:
    """The request line and headers (RFC 9112), strictly; raises _BadRequestError."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequestError("malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha():
        raise _BadRequestError("unsupported HTTP version or method")
    if not target.startswith("/"):
        raise _BadRequestError("request target must be an absolute path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise _BadRequestError("malformed header line")
        name = name.lower()
        value = value.strip()
        if name in headers:
            if name in ("content-length", "transfer-encoding", "host"):
                raise _BadRequestError(f"repeated {name} header")
            headers[name] += ", " + value
        else:
            headers[name] = value
    path, _, query = target.partition("?")
    conn = headers.get("connection", "").lower()
    keep_alive = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    length: int | None = 0
    if te is not None:
        # Both headers at once is a request-smuggling pattern (RFC 9112 6.3).
        if cl is not None:
            raise _BadRequestError("both Transfer-Encoding and Content-Length")
        if te.lower() != "chunked":
            raise _BadRequestError("unsupported Transfer-Encoding")
        length = None
    elif cl is not None:
        if not cl.isdigit() or len(cl) > 12:
            raise _BadRequestError("invalid Content-Length")
        length = int(cl)
        if length > max_body:
            raise _BadRequestError(f"request body larger than {max_body} bytes")
    return _Head(method, path, query, headers, keep_alive, length)


def _parse_chunked(buf: bytearray, start: int, max_body: int) -> tuple[bytes, int] | None:
    """(body, end offset) of a complete chunked body at ``start``, or None if incomplete."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > 64:
                raise _BadRequestError("invalid chunk size")
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadRequestError("invalid chunk size") from None
        if size < 0 or len(out) + size > max_body:
            raise _BadRequestError(f"request body larger than {max_body} bytes")
        pos = eol + 2
        if size == 0:
            # Trailers (ignored) end with an empty line.
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(out), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise _BadRequestError("malformed chunk")
        pos += size + 2


def _serialize(response: Response, keep_alive: bool) -> bytes:
    head = (f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            # Responses carry key material: never cache them.
            "Cache-Control: no-store\r\n")
    for k, v in response.headers.items():
        head += f"{k}: {v}\r\n"
    if not keep_alive:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode("latin-1") + response.body


class _Connection(asyncio.Protocol):
    def __init__(self, listener: HttpsListener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: _Head | None = None
        self._body_start = 0
        self._continued = False
        self._closing = False
        self.caller: str | None = None
        self.last_activity = self._loop.time()
        self.request_started: float | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - a stream server
        self._transport = transport
        listener = self._listener
        if len(listener.connections) >= listener.max_connections:
            self._reply(error_response(503, "too many connections", close=True), False)
            return
        listener.connections.add(self)
        self.caller = caller_cn(transport.get_extra_info("peercert"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.connections.discard(self)
        self._transport = None

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        now = self._loop.time()
        self.last_activity = now
        if self.request_started is None:
            self.request_started = now
        self._buf += data
        try:
            while not self._closing and self._step():
                pass
        except _BadRequestError as exc:
            self._reply(error_response(400, str(exc), close=True), False, linger=True)

    # -- parsing -----------------------------------------------------------------------

    def _step(self) -> bool:
        """Handle one complete request from the buffer; False when more bytes are needed."""
        listener = self._listener
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER:
                    raise _BadRequestError("request head too large")
                return False
            if end > MAX_HEADER:
                raise _BadRequestError("request head too large")
            self._head = _parse_head(bytes(buf[:end]), listener.max_body)
            self._body_start = end + 4
            self._continued = False
        head = self._head
        if head.length is None:
            parsed = _parse_chunked(buf, self._body_start, listener.max_body)
        elif len(buf) >= self._body_start + head.length:
            stop = self._body_start + head.length
            parsed = (bytes(buf[self._body_start:stop]), stop)
        else:
            parsed = None
        if parsed is None:
            if not self._continued and head.headers.get("expect", "").lower() == "100-continue":
                self._continued = True
                if self._transport is not None:
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        body, end = parsed
        del buf[:end]
        self._head = None
        self.request_started = self._loop.time() if buf else None
        try:
            response = listener.handler(
                Request(head.method, head.path, head.query, head.headers, body), self.caller)
        except Exception:
            # The handler maps every expected failure itself; this is a bug.
            listener.log.exception("request crashed",
                                   extra={"listener": listener.name, "path": head.path})
            response = error_response(503, "internal error")
        keep_alive = head.keep_alive and not response.close
        self._reply(response, keep_alive)
        return keep_alive

    def _reply(self, response: Response, keep_alive: bool, linger: bool = False) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(_serialize(response, keep_alive))
        if not keep_alive and linger:
            # Lingering close: a client still sending a refused request
            # would get a TCP reset, and maybe lose this answer, if we closed
            # with its bytes unread. Read and drop them for a moment first.
            self._closing = True
            self._loop.call_later(_LINGER, self.close)
        elif not keep_alive:
            self.close()

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()  # flushes the answer already written

    def expire(self) -> None:
        """Idle too long: close, or abort if the client never read its last answer."""
        # A transport already closing (its connection_lost still to come) has
        # no SSL protocol left to ask for its buffer size.
        transport = self._transport
        if transport is not None and not transport.is_closing() \
                and transport.get_write_buffer_size():
            self.abort()
        else:
            self.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


class HttpsListener:
    """One TLS listener calling ``handler(request, caller_cn)`` for each request."""

    def __init__(self, name: str, host: str, port: int, context: ssl.SSLContext,
                 handler: Handler, log: logging.Logger, *, max_connections: int = 512,
                 idle_timeout: float = 60.0, request_timeout: float = 10.0,
                 max_body: int = 64 * 1024) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.handler = handler
        self.log = log
        self.max_connections = max_connections
        self.max_body = max_body
        self.connections: set[_Connection] = set()
        self._context = context
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, ssl=self._context,
            ssl_handshake_timeout=self._request_timeout, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = loop.time()
            for conn in list(self.connections):
                started = conn.request_started
                if started is not None and now - started > self._request_timeout:
                    conn.abort()  # a request that stalled half-way
                elif started is None and now - conn.last_activity > self._idle_timeout:
                    conn.expire()  # an idle keep-alive connection

    async def stop(self) -> None:
        """Stop accepting, then close every open connection (answers are already written)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
