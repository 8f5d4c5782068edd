"""The one table from a neighbour's ETSI 020 answer to a typed outcome.

Whatever a neighbour answers (a kmstn node or a foreign KMS) becomes either
its ack containers or a :class:`~kme.errors.KmstnError` with an ErrorCode, here
and nowhere else; no caller looks at HTTP statuses, bodies or error texts.
Problem details (RFC 9457, ETSI 020 clause 5.5 of the spec note) are read by
their ``details`` key, which ETSI 020 standardises; a key we do not know
falls back to the HTTP status.

A 400 or 401 means the neighbour kept nothing (rule 6.2); such errors carry
``reason="refused"``, so a failed delivery does not send it a void.
"""

from __future__ import annotations

import json
from typing import Final

from kme import etsi020
from kme.errors import ErrorCode, KmstnError
from kme.etsi020 import AckContainer

__all__ = ["BY_DETAILS_KEY", "BY_STATUS", "read_answer"]

# ETSI 020 problem-details keys (and kmstn's two envelope ones) -> ErrorCode.
BY_DETAILS_KEY: Final[dict[str, ErrorCode]] = {
    "missing_parameters": ErrorCode.INVALID_ARGUMENT,
    "target_sae_id_not_recognized": ErrorCode.UNKNOWN_SAE,
    "invalid_routing": ErrorCode.INVALID_ROUTING,
    "key_not_present": ErrorCode.KEY_NOT_FOUND,
    "key_id_conflict": ErrorCode.KEY_CONFLICT,
    "unauthorized": ErrorCode.PERMISSION_DENIED,
    "insufficient_key_material": ErrorCode.INSUFFICIENT_KEY,
    "no_known_route": ErrorCode.NO_ROUTE,
    "no_route_multiple_targets": ErrorCode.NO_ROUTE,
    "timeout": ErrorCode.TIMEOUT,
    "server_side_general_error": ErrorCode.UNAVAILABLE,
    "unsupported_mandatory_extension": ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION,
    "ack_not_understood": ErrorCode.INVALID_ARGUMENT,
    "key_voiding_error": ErrorCode.INVALID_ARGUMENT,
    "no_all_confirmation": ErrorCode.INVALID_ARGUMENT,
    "envelope_rejected": ErrorCode.TAMPERED,
    "unknown_session": ErrorCode.UNKNOWN_SESSION,
}

# Any other answer, by HTTP status; everything unlisted is UNAVAILABLE.
BY_STATUS: Final[dict[int, ErrorCode]] = {
    400: ErrorCode.INVALID_ARGUMENT,
    401: ErrorCode.PERMISSION_DENIED,
    403: ErrorCode.PERMISSION_DENIED,
    404: ErrorCode.INVALID_ARGUMENT,
    408: ErrorCode.TIMEOUT,
    409: ErrorCode.KEY_CONFLICT,
    503: ErrorCode.UNAVAILABLE,
    504: ErrorCode.TIMEOUT,
}

_MAX_SHOWN: Final = 512


def _problem(status: int, body: bytes) -> KmstnError:
    code = BY_STATUS.get(status, ErrorCode.UNAVAILABLE)
    message = f"the neighbour answered HTTP {status}"
    key = None
    try:
        doc = json.loads(body)
        details = doc.get("details") if isinstance(doc, dict) else None
    except (ValueError, UnicodeDecodeError):
        details = None
    if isinstance(details, dict):
        for name, text in details.items():
            if name in BY_DETAILS_KEY:
                key, code = name, BY_DETAILS_KEY[name]
                if isinstance(text, str) and text.isprintable():
                    message = text[:_MAX_SHOWN]
                break
    refused = status in (400, 401, 403, 404, 409)
    return KmstnError(code, message, reason="refused" if refused else key,
                      cause=f"HTTP {status} {key or ''}".strip())


def read_answer(status: int, body: bytes, message_type: str) -> list[AckContainer]:
    """The ack containers of a synchronous answer, or the typed error it stands for."""
    if status == 200:
        if message_type == "ack":
            return []
        return etsi020.parse_acks(body, allow_empty=message_type == "void")
    raise _problem(status, body)
