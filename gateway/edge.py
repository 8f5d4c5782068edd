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
- Every refusal and drop is counted in :class:`EdgeCounters` (read by a
  Prometheus family, kme.metrics.register_edge_counters) and summarised in
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
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from gateway.edgestate import (
    RECV,
    SUMMARY_INTERVAL_S,
    Closing,
    EdgeConn,
    EdgeCounters,
    EdgeSettings,
    Pool,
    Render,
    authority_matcher,
    reset_connection,
)
from gateway.edgetls import (
    StdlibTls,
    TlsEngine,
    TlsHandshakeError,
    WantRead,
    WantWrite,
)
from gateway.http1 import Limits, Refused, Request, RequestReader

__all__ = [
    "EdgeConn",
    "EdgeCounters",
    "EdgeSettings",
    "FrontLoop",
    "Render",
    "StdlibTls",
    "TlsEngine",
    "authority_matcher",
]

_SWEEP_S: Final = 0.1  # deadline granularity
_ACCEPT_BATCH: Final = 64


class FrontLoop(Closing):
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
        self._handshaking = Pool()
        self._idle = Pool()  # wait, head and body
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
                reset_connection(sock)
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
        except (OSError, ssl.SSLError):
            self.counters.add("handshake_failed")
            reset_connection(sock)
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
                data = self._tls.recv(conn.tls, RECV)
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
