"""The edge's bookkeeping: settings, counters, one connection, pools, and closing.

Used by the front loop (gateway/edge.py); :class:`Closing` holds the part of the
loop that answers a refusal, flushes it, lingers and closes, so the loop's own
module stays about accepting, handshaking and reading.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from gateway.edgetls import TlsEngine, WantRead, WantWrite
from gateway.http1 import Refused, RequestReader
from kme.config import GatewaySettings

__all__ = ["Closing", "EdgeConn", "EdgeCounters", "EdgeSettings", "Pool", "Render",
           "authority_matcher", "method_of", "reset_connection"]

State = Literal["handshake", "wait", "head", "body", "busy", "closing"]
# Render a refusal as a complete HTTP response: (refusal, request method, request ID).
Render = Callable[[Refused, str, str], bytes]

LINGER_S: Final = 2.0  # after a refusal, how long incoming bytes are read and discarded
LINGER_BYTES: Final = 1 << 20
RECV: Final = 65_536
SUMMARY_INTERVAL_S: Final = 10.0


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


class Pool:
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


class Closing:
    """Refusing, flushing, lingering and closing connections (a part of the front loop)."""

    _name: str
    _log: logging.Logger
    _tls: TlsEngine
    _render: Render
    _sel: selectors.BaseSelector
    _handshaking: Pool
    _idle: Pool
    _closing: dict[int, EdgeConn]
    counters: EdgeCounters
    _busy: set[int]

    def _refuse(self, conn: EdgeConn, exc: Refused, counter: str = "refused_request") -> None:
        self.counters.add(counter)
        request_id = str(uuid.uuid4())
        # A malformed request gets its own line; a stalled one is a stall like
        # a stalled handshake, counted and summarised per interval instead.
        self._log.log(logging.DEBUG if exc.timeout else logging.WARNING, "request refused",
                      extra={"listener": self._name, "peer": conn.source,
                             "reason": exc.message, "request_id": request_id})
        method = method_of(conn)
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
                data = socket.socket.recv(conn.sock, RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
            if not data:
                break
            total += len(data)
        self._close(conn)

    # -- deadlines and closing ----------------------------------------------------------


    # -- deadlines ------------------------------------------------------------------

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
            reset_connection(conn.sock)
        else:
            with contextlib.suppress(OSError):
                conn.sock.close()




def method_of(conn: EdgeConn) -> str:
    return conn.reader.method or "GET"


def reset_connection(sock: socket.socket) -> None:
    """Close without the TIME_WAIT of a normal close: for connections never served."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
