"""Who is calling: the subject CN of the verified TLS client certificate.

Under Gunicorn (ETSI 014) the certificate comes from the worker's SSL
socket; under cheroot (ETSI 020) gateway/serve020.py puts the peer's
certificate and the negotiated TLS group into the WSGI environ after the
handshake. The identity is never read from the URL, a header or the body.

OpenSSL has verified the chain by then; it does not refuse a leaf that is a
CA certificate, nor one without an extended key usage. ETSI GS QKD 014
clause 2 (and 020 clause 2) authenticate the client by its certificate, so
that certificate must be one issued to a client: :func:`check_client_certificate`
requires an end-entity certificate (BasicConstraints absent or CA:FALSE)
whose extended key usage includes clientAuth.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kme.errors import ErrorCode, KmstnError

__all__ = ["PEER_CERT_KEY", "TLS_GROUP_KEY", "TLS_VERSION_KEY", "caller_identity",
           "check_client_certificate"]

PEER_CERT_KEY = "kmstn.peer_cert"  # a cryptography x509.Certificate
TLS_GROUP_KEY = "kmstn.tls_group"
TLS_VERSION_KEY = "kmstn.tls_version"


def check_client_certificate(cert: x509.Certificate) -> str:
    """The CN of a certificate fit to authenticate a client; UNAUTHENTICATED (401) if not."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = basic.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise KmstnError(ErrorCode.UNAUTHENTICATED,
                         "the client certificate must be an end-entity certificate (CA:FALSE)",
                         cause=f"certificate serial {cert.serial_number:x} is a CA")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise KmstnError(ErrorCode.UNAUTHENTICATED,
                         "the client certificate must allow TLS client authentication "
                         "(extended key usage clientAuth)",
                         cause=f"certificate serial {cert.serial_number:x}")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if len(names) == 1 else None
    if not isinstance(value, str) or not value:
        raise KmstnError(ErrorCode.UNAUTHENTICATED, "a client certificate with one CN is required")
    return value


@lru_cache(maxsize=1024)
def _identity_of_der(der: bytes) -> tuple[str | None, str, str | None]:
    """(CN, refusal text, cause): checked once per distinct certificate, not per request."""
    try:
        return check_client_certificate(x509.load_der_x509_certificate(der)), "", None
    except KmstnError as exc:
        return None, exc.public, exc.cause
    except ValueError:
        return None, "unreadable client certificate", None


def caller_identity(environ: Mapping[str, Any]) -> str:
    """The CN of the verified client certificate, or UNAUTHENTICATED (401)."""
    cert = environ.get(PEER_CERT_KEY)
    if isinstance(cert, x509.Certificate):
        return check_client_certificate(cert)
    sock = environ.get("gunicorn.socket")
    der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
    if not der:
        raise KmstnError(ErrorCode.UNAUTHENTICATED, "a client certificate with one CN is required")
    cn, refusal, cause = _identity_of_der(der)
    if cn is None:
        raise KmstnError(ErrorCode.UNAUTHENTICATED, refusal, cause=cause)
    return cn
