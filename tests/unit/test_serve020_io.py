"""The edge's pyOpenSSL reads (ETSI 020): how a peer that vanished is told from a TLS error."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from gateway.edgetls import WantRead
from gateway.edgetls_openssl import PyOpenSslTls


class FakeConn:
    """recv raises what pyOpenSSL raised for a real connection."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def recv(self, size: int) -> bytes:
        raise self._error


@pytest.mark.parametrize("error", [
    SSL.Error([]),  # reset: OpenSSL left its error queue empty
    SSL.Error([("SSL routines", "", "unexpected eof while reading")]),
    SSL.ZeroReturnError(),  # close_notify
    SSL.SysCallError(-1, "Unexpected EOF"),
])
def test_a_peer_that_went_away_is_end_of_file(error: Exception) -> None:
    tls = PyOpenSslTls(SSL.Context(SSL.TLS_METHOD))
    assert tls.recv(FakeConn(error), 16) == b""


def test_a_real_tls_error_is_a_connection_error() -> None:
    tls = PyOpenSslTls(SSL.Context(SSL.TLS_METHOD))
    with pytest.raises(ConnectionError, match="bad record mac"):
        tls.recv(FakeConn(SSL.Error([("SSL routines", "", "bad record mac")])), 16)


def test_nothing_yet_is_want_read() -> None:
    tls = PyOpenSslTls(SSL.Context(SSL.TLS_METHOD))
    with pytest.raises(WantRead):
        tls.recv(FakeConn(SSL.WantReadError()), 16)
