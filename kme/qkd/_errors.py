"""How a QKD device's answers become KmstnErrors (ETSI 014 clauses 4.5 and 5).

Errors map to ``ErrorCode`` (the device's own words go to ``cause`` for the
private log, never to ``public``):

============================  ====================================================
device answer                 KmstnError code
============================  ====================================================
400 ``one or more keys ...``  KEY_NOT_FOUND (any 400 or 404 on dec_keys)
400 ``size shall be ...``     SIZE_NOT_MULTIPLE_OF_8
400 extension messages        UNSUPPORTED_ / UNSATISFIED_MANDATORY_EXTENSION
other 400                     INVALID_ARGUMENT
401                           UNAUTHENTICATED (status, enc_keys), PERMISSION_DENIED (dec_keys)
503 on enc_keys               INSUFFICIENT_KEY, or UNAVAILABLE for a link outage
503 on status, dec_keys       UNAVAILABLE
other status, bad JSON        UNAVAILABLE
no connection                 UNAVAILABLE
no answer within timeout_ms   TIMEOUT
============================  ====================================================
"""

from __future__ import annotations

from typing import Final, Literal

from kme import etsi014
from kme.errors import ErrorCode, KmstnError

__all__ = ["Op", "device_error"]

# The emulator marks a 503 caused by an outage window with this details key.
_OUTAGE_DETAIL: Final = "link_outage"
Op = Literal["status", "enc_keys", "dec_keys"]


def device_error(link_id: str, op: Op, status: int, content: bytes) -> KmstnError:
    """The error for a non-200 answer of the device on ``link_id`` to call ``op``."""
    message, details = etsi014.parse_error_body(content)
    said = message if message is not None else content[:200].decode("utf-8", "replace")
    cause = f"{link_id} {op}: HTTP {status}: {said[:300]}"
    if op == "dec_keys" and status in (400, 404):
        # Clause 5.4: our Key IDs body is well formed by construction, so
        # a 400 means the IDs were not found (404 from some vendors,
        # spec note section 6).
        return KmstnError(ErrorCode.KEY_NOT_FOUND, etsi014.MSG_KEYS_NOT_FOUND, cause=cause)
    if status == 400:
        code, public = {
            etsi014.MSG_KEYS_NOT_FOUND: (ErrorCode.KEY_NOT_FOUND,
                                         etsi014.MSG_KEYS_NOT_FOUND),
            etsi014.MSG_SIZE_NOT_MULTIPLE_OF_8: (ErrorCode.SIZE_NOT_MULTIPLE_OF_8,
                                                 etsi014.MSG_SIZE_NOT_MULTIPLE_OF_8),
            etsi014.MSG_EXT_MANDATORY_UNSUPPORTED: (
                ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION,
                etsi014.MSG_EXT_MANDATORY_UNSUPPORTED),
            etsi014.MSG_EXT_MANDATORY_UNMET: (ErrorCode.UNSATISFIED_MANDATORY_EXTENSION,
                                              etsi014.MSG_EXT_MANDATORY_UNMET),
        }.get(message or "", (ErrorCode.INVALID_ARGUMENT,
                              "the QKD device refused the request"))
        return KmstnError(code, public, cause=cause)
    if status == 401:
        if op == "dec_keys":
            return KmstnError(ErrorCode.PERMISSION_DENIED,
                              "the QKD device does not release these keys to this node",
                              cause=cause)
        return KmstnError(ErrorCode.UNAUTHENTICATED,
                          "the QKD device did not accept this node's credentials",
                          cause=cause)
    if status == 503:
        outage = any(_OUTAGE_DETAIL in d for d in details)
        if op == "enc_keys" and not outage:
            return KmstnError(ErrorCode.INSUFFICIENT_KEY,
                              "not enough QKD key material on the device", cause=cause)
        return KmstnError(ErrorCode.UNAVAILABLE, "the QKD device is unavailable",
                          cause=cause)
    return KmstnError(ErrorCode.UNAVAILABLE, "the QKD device answered with an error",
                      cause=cause)
