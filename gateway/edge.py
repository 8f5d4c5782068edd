"""The edge of both ETSI listeners: a front loop that a slow client cannot hold.

Before this loop, Gunicorn (ETSI 014) and cheroot (ETSI 020) did the TLS
handshake and read the request head inside one of their request threads,
with no deadline: 33 clients that sent five bytes and waited stopped a node.
Now one thread per listener process runs :class:`FrontLoop`, a selector loop
that owns every connection until a complete request is in memory:

    accept ─▶ HANDSHAKE ─▶ WAIT ─▶ HEAD ─▶ BODY ─▶ BUSY (a worker) ─▶ WAIT ...
                  │          │       │       │
            handshake    keep-alive header   body      deadlines; over a cap,
             deadline     timeout  deadline deadline    the oldest is dropped

- The TLS handshake is driven non-blocking here (Python's ssl for 014,
  pyOpenSSL for 020, both behind :class:`TlsEngine`), so a stalled handshake
  costs a file descriptor, never a worker, and is closed at its deadline.
- The request is read and framed here (gateway/http1.py); a worker gets it
  as bytes and never reads from the network. Malformed requests, oversized
  ones and stalled ones are answered here, through the listener's renderer
  (an ETSI status with its JSON body, from gateway/errors.py), with one
  WARNING line each and no traceback, then the connection closes after a
  short linger (so the client reads the answer instead of a reset).
- Caps, per source address and in total, on connections in their handshake
  and on connections waiting for or sending a request. Over a per-source
  handshake cap a new connection is refused; over any other cap the oldest
  connection of that class (of that source, for a per-source cap) is
  dropped. Stalls spread over many addresses thus cost the stalls, not the
  newest connections: a real client's handshake takes milliseconds, so it is
  never the oldest.
- Every refusal and drop is counted in :class:`EdgeCounters` (a later
  metrics endpoint reads :meth:`EdgeCounters.snapshot`) and summarised in
  one WARNING line per interval, never one per connection.

Caps are per listener process (each Gunicorn worker runs its own loop).
Responses are written by the workers, on a socket with a send timeout.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import selectors
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from OpenSSL import SSL

from gateway.http1 import Limits, Refused, Request, RequestReader
from kme.config import GatewaySettings

__all__ = [
    "EdgeConn",
    "EdgeCounters",
    "EdgeSettings",
    "FrontLoop",
    "PyOpenSslTls",
    "Render",
    "StdlibTls",
    "TlsEngine",
    "authority_matcher",
]

State = Literal["handshake", "wait", "head", "body", "busy", "closing"]
# Render a refusal as a complete HTTP response: (refusal, request method, request ID).
Render = Callable[[Refused, str, str], bytes]

LINGER_S: Final = 2.0  # after a refusal, how long incoming bytes are read and discarded
LINGER_BYTES: Final = 1 << 20
SUMMARY_INTERVAL_S: Final = 10.0
_SWEEP_S: Final = 0.1  # deadline granularity
_ACCEPT_BATCH: Final = 64
_RECV: Final = 65_536


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    handshake_timeout: float
    header_timeout: float
    body_timeout: float
    idle_timeout: float
    send_timeout: float  # a worker writing an answer to a client that does not read
    max_handshakes: int
    max_handshakes_per_source: int
    max_idle: int
    max_idle_per_source: int

    @classmethod
    def from_config(cls, g: GatewaySettings) -> EdgeSettings:
        return cls(
            handshake_timeout=g.handshake_timeout_ms / 1000,
            header_timeout=g.header_timeout_ms / 1000,
            body_timeout=g.body_timeout_ms / 1000,
            idle_timeout=g.keepalive_timeout_ms / 1000,
            send_timeout=g.body_timeout_ms / 1000,
            max_handshakes=g.max_handshakes,
            max_handshakes_per_source=g.max_handshakes_per_source,
            max_idle=g.max_idle,
            max_idle_per_source=g.max_idle_per_source,
        )


class EdgeCounters:
    """Counts of connections refused, dropped or timed out at the edge; thread-safe.

    Over a cap: ``refused_handshake_per_source``, ``dropped_handshake_total``,
    ``dropped_idle_per_source``, ``dropped_idle_total``. Deadlines:
    ``handshake_timeout``, ``header_timeout``, ``body_timeout``,
    ``idle_timeout``. Others: ``handshake_failed``, ``refused_request``.
    """

    OVER_CAP: Final = ("refused_handshake_per_source", "dropped_handshake_total",
                       "dropped_idle_per_source", "dropped_idle_total")
    STALLS: Final = ("handshake_timeout", "header_timeout", "body_timeout")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._logged: dict[str, int] = {}
        self.gauges: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        """Totals since start (monotonic counters)."""
        with self._lock:
            return dict(self._counts)

    def since_last_summary(self) -> dict[str, int]:
        """What changed since the previous call (for the interval log line)."""
        with self._lock:
            delta = {k: v - self._logged.get(k, 0) for k, v in self._counts.items()
                     if v != self._logged.get(k, 0)}
            self._logged = dict(self._counts)
        return delta


class WantRead(Exception):  # noqa: N818 - flow control, not a failure
    pass


class WantWrite(Exception):  # noqa: N818 - flow control, not a failure
    pass


class TlsHandshakeError(Exception):
    pass


class TlsEngine(Protocol):
    """Non-blocking TLS for the loop: one implementation per TLS library."""

    def wrap(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        """(the socket that owns the descriptor, the TLS connection)."""
        ...

    def handshake(self, tls: Any) -> None: ...

    def recv(self, tls: Any, size: int) -> bytes: ...

    def send(self, tls: Any, data: bytes) -> int: ...

    def to_worker(self, conn: EdgeConn, send_timeout: float) -> None: ...

    def to_loop(self, conn: EdgeConn) -> None: ...

    def close_notify(self, tls: Any) -> None:
        """Send TLS close_notify if it fits now (best effort; the socket closes next)."""
        ...


class StdlibTls:
    """Python's ssl (ETSI 014): an SSLSocket whose handshake is not done on connect."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx

    def wrap(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        tls = self._ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False,
                                    suppress_ragged_eofs=True)
        return tls, tls

    def handshake(self, tls: Any) -> None:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            raise WantRead from None
        except ssl.SSLWantWriteError:
            raise WantWrite from None
        except (ssl.SSLError, OSError) as exc:
            raise TlsHandshakeError(str(exc)) from None

    def recv(self, tls: Any, size: int) -> bytes:
        try:
            return bytes(tls.recv(size))
        except ssl.SSLWantReadError:
            raise WantRead from None
        except ssl.SSLWantWriteError:
            raise WantWrite from None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionError(str(exc)) from None

    def send(self, tls: Any, data: bytes) -> int:
        try:
            return int(tls.send(data))
        except ssl.SSLWantReadError:
            raise WantRead from None
        except ssl.SSLWantWriteError:
            raise WantWrite from None
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionError(str(exc)) from None

    def to_worker(self, conn: EdgeConn, send_timeout: float) -> None:
        # Gunicorn writes with sendall(): blocking, but never longer than this.
        conn.tls.settimeout(send_timeout)

    def to_loop(self, conn: EdgeConn) -> None:
        conn.tls.setblocking(False)

    def close_notify(self, tls: Any) -> None:
        # unwrap() writes close_notify, then wants the peer's: WantRead here.
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            tls.unwrap()


class PyOpenSslTls:
    """pyOpenSSL (ETSI 020, X25519MLKEM768): an SSL.Connection on a non-blocking socket."""

    def __init__(self, ctx: SSL.Context) -> None:
        self._ctx = ctx

    def wrap(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        tls = SSL.Connection(self._ctx, sock)
        tls.set_accept_state()
        return sock, tls

    def handshake(self, tls: Any) -> None:
        try:
            tls.do_handshake()
        except SSL.WantReadError:
            raise WantRead from None
        except SSL.WantWriteError:
            raise WantWrite from None
        except (SSL.Error, OSError) as exc:
            raise TlsHandshakeError(repr(exc)) from None

    def recv(self, tls: Any, size: int) -> bytes:
        try:
            return bytes(tls.recv(size))
        except SSL.WantReadError:
            raise WantRead from None
        except SSL.WantWriteError:
            raise WantWrite from None
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] in (-1, 0):  # EOF without close_notify
                return b""
            raise ConnectionError(repr(exc)) from None
        except SSL.Error as exc:
            # A peer that vanished without close_notify (a killed process):
            # OpenSSL 3 says "unexpected eof", or leaves its error queue empty
            # when the connection was reset. That is the end of the stream.
            errors = exc.args[0] if exc.args else []
            if not errors or any("unexpected eof" in str(e).lower() for e in errors):
                return b""
            raise ConnectionError(repr(exc)) from None
        except OSError as exc:
            raise ConnectionError(repr(exc)) from None

    def send(self, tls: Any, data: bytes) -> int:
        try:
            return int(tls.send(data))
        except SSL.WantReadError:
            raise WantRead from None
        except SSL.WantWriteError:
            raise WantWrite from None
        except (SSL.Error, OSError) as exc:
            raise ConnectionError(repr(exc)) from None

    def to_worker(self, conn: EdgeConn, send_timeout: float) -> None:
        # The socket stays non-blocking: serve020's writer waits with select().
        del conn, send_timeout

    def to_loop(self, conn: EdgeConn) -> None:
        del conn

    def close_notify(self, tls: Any) -> None:
        with contextlib.suppress(SSL.Error, OSError):
            tls.shutdown()


class EdgeConn:
    """One client connection as the loop sees it. ``handle`` belongs to the server behind."""

    __slots__ = ("deadline", "events", "handle", "out", "peer", "reader", "seq", "sock",
                 "source", "state", "tls")

    def __init__(self, sock: socket.socket, tls: Any, peer: Any, seq: int,
                 reader: RequestReader) -> None:
        self.sock = sock
        self.tls = tls
        self.peer = peer
        self.source = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self.seq = seq
        self.reader = reader
        self.state: State = "handshake"
        self.deadline = 0.0
        self.events = 0
        self.out = b""
        self.handle: Any = None


class _Pool:
    """Connections of one class, oldest first, overall and per source address."""

    def __init__(self) -> None:
        self._all: OrderedDict[int, EdgeConn] = OrderedDict()
        self._by_source: dict[str, OrderedDict[int, EdgeConn]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[EdgeConn]:
        return iter(list(self._all.values()))  # a copy: callers close as they go

    def count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def add(self, conn: EdgeConn) -> None:
        self._all[conn.seq] = conn
        self._by_source.setdefault(conn.source, OrderedDict())[conn.seq] = conn

    def discard(self, conn: EdgeConn) -> None:
        if self._all.pop(conn.seq, None) is None:
            return
        mine = self._by_source[conn.source]
        mine.pop(conn.seq, None)
        if not mine:
            del self._by_source[conn.source]

    def oldest(self, source: str | None = None) -> EdgeConn | None:
        group = self._all if source is None else self._by_source.get(source)
        return next(iter(group.values()), None) if group else None


def authority_matcher(host: str, port: int) -> Callable[[str], bool]:
    """Whether an absolute-form authority names this listener (RFC 9112 3.2.2)."""
    want = host.lower().strip("[]")

    def accept(authority: str) -> bool:
        name, _, port_text = authority.rpartition(":") if not authority.endswith("]") \
            else (authority, "", "")
        if not name:
            name, port_text = authority, ""
        try:
            got_port = int(port_text) if port_text else 443
        except ValueError:
            return False
        return name.lower().strip("[]") == want and got_port == port

    return accept


class FrontLoop:
    """The selector loop of one listener process (see the module docstring)."""

    def __init__(self, *, name: str, listeners: Sequence[Any], tls: TlsEngine,
                 settings: EdgeSettings, limits: Limits,
                 accept_authority: Callable[[str], bool], render: Render,
                 dispatch: Callable[[EdgeConn, Request], None], counters: EdgeCounters,
                 log: logging.Logger) -> None:
        self._name = name
        self._listeners = list(listeners)
        self._tls = tls
        self._settings = settings
        self._limits = limits
        self._accept_authority = accept_authority
        self._render = render
        self._dispatch = dispatch
        self.counters = counters
        self._log = log
        self._sel = selectors.DefaultSelector()
        self._handshaking = _Pool()
        self._idle = _Pool()  # wait, head and body
        self._closing: dict[int, EdgeConn] = {}
        self._busy: set[int] = set()
        self._seq = 0
        self._resumed: queue.SimpleQueue[tuple[EdgeConn, bool]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._accepting = False
        self._accept_paused_until = 0.0  # after EMFILE and the like (see _accept)
        self._stopping = False
        self._next_sweep = 0.0
        self._next_summary = time.monotonic() + SUMMARY_INTERVAL_S
        self.set_accepting(True)

    # -- thread-safe entry points --------------------------------------------------

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the loop
            os.write(self._wake_w, b"\0")

    def resume(self, conn: EdgeConn, keep_alive: bool) -> None:
        """A worker is done with ``conn``: keep it for the next request, or close it."""
        self._resumed.put((conn, keep_alive))
        self.wake()

    def watch(self, fd: int) -> None:
        """Wake the loop when ``fd`` is readable (a signal wake-up pipe); it is drained."""
        self._sel.register(fd, selectors.EVENT_READ, ("drain", fd))

    # -- running -----------------------------------------------------------------------

    @property
    def busy(self) -> int:
        return len(self._busy)

    def set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        for listener in self._listeners:
            if on:
                listener.setblocking(False)
                self._sel.register(listener, selectors.EVENT_READ, ("listen", listener))
            else:
                self._sel.unregister(listener)
        self._accepting = on

    def run(self, keep_going: Callable[[], bool], tick: Callable[[], None] = lambda: None,
            drain_timeout: float = 10.0) -> None:
        """Serve until ``keep_going()`` is false, then drain (see :meth:`drain`)."""
        while keep_going():
            tick()
            self.run_once(1.0)
        self.drain(drain_timeout, tick)

    def drain(self, timeout: float, tick: Callable[[], None] = lambda: None) -> None:
        """Stop accepting, close connections waiting for a request, let busy ones finish."""
        self._stopping = True
        self._accept_paused_until = 0.0
        self.set_accepting(False)
        for conn in [*self._handshaking, *(c for c in self._idle if c.state == "wait")]:
            self._close(conn)
        end = time.monotonic() + timeout
        while (self._busy or len(self._idle) or self._closing) and time.monotonic() < end:
            tick()
            self.run_once(0.2)
            for conn in [c for c in self._idle if c.state == "wait"]:
                self._close(conn)
        self.close_all()

    def close_all(self) -> None:
        for conn in [*self._handshaking, *self._idle, *self._closing.values()]:
            self._close(conn)
        self._drain_resumed(closing=True)

    def run_once(self, timeout: float) -> None:
        now = time.monotonic()
        if len(self._handshaking) or len(self._idle) or self._closing:
            timeout = min(timeout, max(self._next_sweep - now, 0.0) + _SWEEP_S / 10)
        try:
            events = self._sel.select(timeout)
        except InterruptedError:
            events = []
        for key, mask in events:
            kind, obj = key.data
            if kind == "listen":
                self._accept(obj)
            elif kind == "conn":
                self._on_event(obj, mask)
            elif kind == "wake":
                self._drain_fd(self._wake_r)
                self._drain_resumed()
            else:
                self._drain_fd(obj)
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self.set_accepting(True)
        if now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + _SWEEP_S
        if now >= self._next_summary:
            self._summary()
            self._next_summary = now + SUMMARY_INTERVAL_S

    @staticmethod
    def _drain_fd(fd: int) -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 4096):
                pass

    # -- accepting and the handshake ---------------------------------------------------

    def _accept(self, listener: Any) -> None:
        s = self._settings
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the listener stays readable,
                    # so stop watching it for a moment rather than spin on it.
                    self.counters.add("accept_failed")
                    self.set_accepting(False)
                    self._accept_paused_until = time.monotonic() + _SWEEP_S
                    return
                raise
            source = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            if self._handshaking.count(source) >= s.max_handshakes_per_source:
                self.counters.add("refused_handshake_per_source")
                _reset(sock)
                continue
            if len(self._handshaking) >= s.max_handshakes:
                oldest = self._handshaking.oldest()
                if oldest is not None:
                    self.counters.add("dropped_handshake_total")
                    self._close(oldest, reset=True)
            self._new_connection(sock, peer)

    def _new_connection(self, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            owner, tls = self._tls.wrap(sock)
        except (OSError, ssl.SSLError, SSL.Error):
            self.counters.add("handshake_failed")
            _reset(sock)
            return
        self._seq += 1
        conn = EdgeConn(owner, tls, peer, self._seq,
                        RequestReader(self._limits, self._accept_authority))
        conn.deadline = time.monotonic() + self._settings.handshake_timeout
        self._handshaking.add(conn)
        self._want(conn, selectors.EVENT_READ)
        self._handshake(conn)

    def _handshake(self, conn: EdgeConn) -> None:
        try:
            self._tls.handshake(conn.tls)
        except WantRead:
            self._want(conn, selectors.EVENT_READ)
            return
        except WantWrite:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except TlsHandshakeError as exc:
            # Routine for scanners and clients without a valid certificate.
            self.counters.add("handshake_failed")
            self._log.debug("TLS handshake failed", extra={"peer": conn.source,
                                                            "error": str(exc)[:200]})
            self._close(conn)
            return
        self._handshaking.discard(conn)
        self._enter_wait(conn)
        self._read(conn)

    # -- waiting for and reading requests ----------------------------------------------

    def _enter_wait(self, conn: EdgeConn) -> None:
        s = self._settings
        if self._idle.count(conn.source) >= s.max_idle_per_source:
            oldest = self._idle.oldest(conn.source)
            if oldest is not None:
                self.counters.add("dropped_idle_per_source")
                self._close(oldest)
        if len(self._idle) >= s.max_idle:
            oldest = self._idle.oldest()
            if oldest is not None:
                self.counters.add("dropped_idle_total")
                self._close(oldest)
        conn.state = "wait"
        conn.deadline = time.monotonic() + s.idle_timeout
        self._idle.add(conn)
        self._want(conn, selectors.EVENT_READ)

    def _on_event(self, conn: EdgeConn, mask: int) -> None:
        if conn.state == "handshake":
            self._handshake(conn)
        elif conn.state in ("wait", "head", "body"):
            self._read(conn)
        elif conn.state == "closing":
            if conn.out:
                self._flush(conn)
            else:
                self._linger(conn)

    def _read(self, conn: EdgeConn) -> None:
        """Read what is there, and dispatch once a whole request is in."""
        if conn.reader.buffered and self._advance(conn):
            return  # a pipelined request was already buffered
        while conn.state in ("wait", "head", "body"):
            try:
                data = self._tls.recv(conn.tls, _RECV)
            except WantRead:
                self._want(conn, selectors.EVENT_READ)
                return
            except WantWrite:
                self._want(conn, selectors.EVENT_WRITE)
                return
            except ConnectionError:
                self._close(conn)
                return
            if not data:
                self._close(conn)  # the client went away, perhaps mid-request
                return
            if conn.state == "wait":
                conn.state = "head"
                conn.deadline = time.monotonic() + self._settings.header_timeout
            conn.reader.feed(data)
            if self._advance(conn):
                return

    def _advance(self, conn: EdgeConn) -> bool:
        """Parse what is buffered; True when the connection left the reading states."""
        try:
            request = conn.reader.poll()
        except Refused as exc:
            self._refuse(conn, exc)
            return True
        if request is not None:
            self._to_worker(conn, request)
            return True
        phase = conn.reader.phase
        now = time.monotonic()
        if phase == "body" and conn.state != "body":
            conn.state = "body"
            conn.deadline = now + self._settings.body_timeout
        elif phase == "head" and conn.state == "wait":
            conn.state = "head"
            conn.deadline = now + self._settings.header_timeout
        if conn.reader.take_continue():
            # RFC 9110 10.1.1: the client waits for this before its body. It is
            # tiny; if it does not fit now, the client sends after its own wait.
            with contextlib.suppress(WantRead, WantWrite, ConnectionError):
                self._tls.send(conn.tls, b"HTTP/1.1 100 Continue\r\n\r\n")
        return False

    def _to_worker(self, conn: EdgeConn, request: Request) -> None:
        self._idle.discard(conn)
        self._want(conn, 0)
        conn.state = "busy"
        self._busy.add(conn.seq)
        try:
            self._tls.to_worker(conn, self._settings.send_timeout)
            self._dispatch(conn, request)
        except Exception:
            self._log.exception("dispatch to a worker failed")
            self._busy.discard(conn.seq)
            self._close(conn)

    def _drain_resumed(self, closing: bool = False) -> None:
        while True:
            try:
                conn, keep = self._resumed.get_nowait()
            except queue.Empty:
                return
            self._busy.discard(conn.seq)
            if not keep or closing or self._stopping or conn.state != "busy":
                self._close(conn)
                continue
            try:
                self._tls.to_loop(conn)
            except OSError:
                self._close(conn)
                continue
            self._enter_wait(conn)
            # A pipelined request may be buffered already, or held by the TLS
            # layer where select() cannot see it: read before waiting.
            self._read(conn)

    # -- refusing ----------------------------------------------------------------------

    def _refuse(self, conn: EdgeConn, exc: Refused, counter: str = "refused_request") -> None:
        self.counters.add(counter)
        request_id = str(uuid.uuid4())
        # A malformed request gets its own line; a stalled one is a stall like
        # a stalled handshake, counted and summarised per interval instead.
        self._log.log(logging.DEBUG if exc.timeout else logging.WARNING, "request refused",
                      extra={"listener": self._name, "peer": conn.source,
                             "reason": exc.message, "request_id": request_id})
        method = _method_of(conn)
        self._idle.discard(conn)
        conn.out = self._render(exc, method, request_id)
        conn.state = "closing"
        conn.deadline = time.monotonic() + LINGER_S
        self._closing[conn.seq] = conn
        self._flush(conn)

    def _flush(self, conn: EdgeConn) -> None:
        while conn.out:
            try:
                sent = self._tls.send(conn.tls, conn.out)
            except WantWrite:
                self._want(conn, selectors.EVENT_WRITE)
                return
            except WantRead:
                self._want(conn, selectors.EVENT_READ)
                return
            except ConnectionError:
                self._close(conn)
                return
            conn.out = conn.out[sent:]
        # Half-close, then read and discard what the client is still sending
        # (the rest of a 100 KB path, say): closing with unread input would
        # make the kernel send a reset, and the client might lose the answer.
        self._tls.close_notify(conn.tls)
        with contextlib.suppress(OSError):
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        self._want(conn, selectors.EVENT_READ)
        self._linger(conn)

    def _linger(self, conn: EdgeConn) -> None:
        total = 0
        while total < LINGER_BYTES:
            try:
                data = socket.socket.recv(conn.sock, _RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
            if not data:
                break
            total += len(data)
        self._close(conn)

    # -- deadlines and closing ----------------------------------------------------------

    def _sweep(self, now: float) -> None:
        for conn in self._handshaking:
            if conn.deadline <= now:
                self.counters.add("handshake_timeout")
                self._close(conn, reset=True)
        for conn in self._idle:
            if conn.deadline > now:
                continue
            if conn.state == "wait":
                self.counters.add("idle_timeout")
                self._close(conn)
            elif conn.state == "head":
                self._refuse(conn, Refused("request head not received in time", timeout=True),
                             "header_timeout")
            else:
                self._refuse(conn, Refused("request body not received in time", timeout=True),
                             "body_timeout")
        for conn in list(self._closing.values()):
            if conn.deadline <= now:
                self._close(conn)
        self.counters.gauges = {"handshaking": len(self._handshaking),
                                "idle": len(self._idle), "busy": len(self._busy)}

    def _summary(self) -> None:
        delta = self.counters.since_last_summary()
        if any(delta.get(k) for k in (*EdgeCounters.OVER_CAP, *EdgeCounters.STALLS)):
            self._log.warning("connections refused or dropped at the edge", extra={
                "listener": self._name, "interval_s": SUMMARY_INTERVAL_S, **delta,
                **self.counters.gauges})

    def _want(self, conn: EdgeConn, events: int) -> None:
        if events == conn.events:
            return
        try:
            if events == 0:
                self._sel.unregister(conn.sock)
            elif conn.events:
                self._sel.modify(conn.sock, events, ("conn", conn))
            else:
                self._sel.register(conn.sock, events, ("conn", conn))
        except (KeyError, ValueError, OSError):
            pass
        conn.events = events

    def _close(self, conn: EdgeConn, reset: bool = False) -> None:
        self._handshaking.discard(conn)
        self._idle.discard(conn)
        self._closing.pop(conn.seq, None)
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
            conn.events = 0
        if conn.state in ("wait", "head", "body") and not reset:
            # A kept-alive connection closed by us (idle, over a cap, at
            # shutdown): close_notify tells the client it was a clean close, so
            # it retries on a new connection instead of reporting an error.
            self._tls.close_notify(conn.tls)
        conn.state = "closing"
        if reset:
            _reset(conn.sock)
        else:
            with contextlib.suppress(OSError):
                conn.sock.close()


def _method_of(conn: EdgeConn) -> str:
    return conn.reader.method or "GET"


def _reset(sock: socket.socket) -> None:
    """Close without the TIME_WAIT of a normal close: for connections never served."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
