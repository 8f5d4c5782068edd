"""kmstn's identity rule: a peer is the subject common name (CN) of its certificate.

The CN is the SAE ID, node ID or device KME ID, across the whole federation
(the lab's throwaway CA, ``lab.pki``, issues certificates that way; a real
deployment's PKI has to as well). The node core reads identities here, so
no service depends on the lab tooling to know who is calling.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["common_name_of"]


def common_name_of(cert_der: bytes) -> str | None:
    """The subject CN of a DER certificate (kmstn's identity rule), or None."""
    cert = x509.load_der_x509_certificate(cert_der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
