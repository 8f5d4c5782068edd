"""The pyOpenSSL TLS engine of the edge (ETSI 020: TLS 1.3, X25519MLKEM768).

Its own module so the ETSI 014 listener, whose edge uses Python's ssl, never
loads pyOpenSSL (gateway/edgetls.py has the protocol both engines follow).
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL

from gateway.edgetls import TlsHandshakeError, WantRead, WantWrite

if TYPE_CHECKING:
    from gateway.edgestate import EdgeConn

__all__ = ["PyOpenSslTls"]


class PyOpenSslTls:
    """pyOpenSSL (ETSI 020, X25519MLKEM768): an SSL.Connection on a non-blocking socket."""

    def __init__(self, ctx: SSL.Context) -> None:
        self._ctx = ctx

    def wrap(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        try:
            tls = SSL.Connection(self._ctx, sock)
        except SSL.Error as exc:  # the loop knows OSError, not pyOpenSSL's errors
            raise OSError(repr(exc)) from None
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
