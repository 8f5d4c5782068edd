"""Who is calling: the subject CN of the verified TLS client certificate.

Under Gunicorn (ETSI 014) the certificate comes from the worker's SSL
socket; under cheroot (ETSI 020) gateway/serve020.py puts the peer's CN and
the negotiated TLS group into the WSGI environ after the handshake. The
identity is never read from the URL, a header or the body.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from kme.errors import ErrorCode, KmstnError
from kme.identity import common_name_of

__all__ = ["PEER_CN_KEY", "TLS_GROUP_KEY", "TLS_VERSION_KEY", "caller_identity"]

PEER_CN_KEY = "kmstn.peer_cn"
TLS_GROUP_KEY = "kmstn.tls_group"
TLS_VERSION_KEY = "kmstn.tls_version"


def caller_identity(environ: Mapping[str, Any]) -> str:
    """The CN of the client certificate, or UNAUTHENTICATED (401)."""
    cn = environ.get(PEER_CN_KEY)
    if cn is None:
        sock = environ.get("gunicorn.socket")
        if isinstance(sock, ssl.SSLSocket):
            der = sock.getpeercert(binary_form=True)
            cn = common_name_of(der) if der else None
    if not isinstance(cn, str) or not cn:
        raise KmstnError(ErrorCode.UNAUTHENTICATED, "a client certificate with one CN is required")
    return cn
