"""gateway.serve020: how the TLS reader under cheroot treats a peer that vanished."""

from __future__ import annotations

from typing import Any

import pytest
from OpenSSL import SSL

from gateway.serve020 import _TlsRawIO


class FakeConn:
    """recv_into raises what pyOpenSSL raised for a real connection."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def gettimeout(self) -> float:
        return 1.0

    def fileno(self) -> int:
        return -1

    def recv_into(self, buf: Any) -> int:
        raise self._error


@pytest.mark.parametrize("error", [
    SSL.Error([]),  # reset: OpenSSL left its error queue empty
    SSL.Error([("SSL routines", "", "unexpected eof while reading")]),
    SSL.ZeroReturnError(),  # close_notify
    SSL.SysCallError(-1, "Unexpected EOF"),
])
def test_a_peer_that_went_away_is_end_of_file(error: Exception) -> None:
    raw = _TlsRawIO(FakeConn(error), "rb")  # type: ignore[arg-type]
    assert raw.readinto(bytearray(16)) == 0


def test_a_real_tls_error_is_a_connection_error() -> None:
    raw = _TlsRawIO(FakeConn(SSL.Error([("SSL routines", "", "bad record mac")])),  # type: ignore[arg-type]
                    "rb")
    with pytest.raises(ConnectionError, match="bad record mac"):
        raw.readinto(bytearray(16))
