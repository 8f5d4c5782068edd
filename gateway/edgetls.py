"""The TLS engines behind the edge's front loop: non-blocking handshakes, reads, writes.

:class:`StdlibTls` (Python's ssl, for ETSI 014) and ``PyOpenSslTls``
(gateway/edgetls_openssl.py,
pyOpenSSL, TLS 1.3 with X25519MLKEM768, for ETSI 020) behind one small
protocol, so the loop (gateway/edge.py) treats both alike.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.edgestate import EdgeConn

__all__ = ["StdlibTls", "TlsEngine", "TlsHandshakeError", "WantRead", "WantWrite"]


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
        # Workers write with sendall(): blocking, but never longer than this.
        conn.tls.settimeout(send_timeout)

    def to_loop(self, conn: EdgeConn) -> None:
        conn.tls.setblocking(False)

    def close_notify(self, tls: Any) -> None:
        # unwrap() writes close_notify, then wants the peer's: WantRead here.
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            tls.unwrap()
