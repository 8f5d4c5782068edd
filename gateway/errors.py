"""The only ETSI status tables of kmstn: ErrorCode -> HTTP for ETSI 014 and ETSI 020
(and for SKIP, draft-cisco-skip-02, served beside ETSI 014).

ETSI GS QKD 014 V1.1.1 (clause 5, status codes): 400 and 503 carry the Error
body ``{"message": ..., "details": [...]}``; 401 carries one too (the spec
defines none, and clients that always parse JSON break on an empty 401).
No other status is ever sent: an unexpected failure is a 503, never a 500.

ETSI GS QKD 020 V1.1.1 (clause 5.5 of the spec note): errors are RFC 9457
problem details ``{type, status, title, details}`` with ``details`` a map of
strings, served as ``application/json`` (the ETSI 020 checklist's media
type for errors); 400 / 401 / 408 / 503 only.

Only public messages ever reach a response; a KmstnError's ``cause`` is for
the private log, and INTERNAL errors answer with a fixed text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

from kme.errors import ErrorCode, KmstnError

__all__ = [
    "ETSI014_STATUS",
    "SKIP_STATUS",
    "Etsi020Problem",
    "RefusalKind",
    "etsi014_error",
    "etsi014_headers",
    "etsi020_problem",
    "refusal_response",
    "skip_error",
]

# -- ETSI GS QKD 014 ---------------------------------------------------------

ETSI014_STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.SIZE_NOT_MULTIPLE_OF_8: 400,
    ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION: 400,
    ErrorCode.UNSATISFIED_MANDATORY_EXTENSION: 400,
    ErrorCode.UNKNOWN_SAE: 400,
    ErrorCode.UNKNOWN_NODE: 400,
    ErrorCode.KEY_NOT_FOUND: 400,
    ErrorCode.KEY_CONFLICT: 400,
    ErrorCode.PERMISSION_DENIED: 401,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.INSUFFICIENT_KEY: 503,
    # ETSI 014 has no 429: over quota is 503 with Retry-After (issue 11).
    ErrorCode.OVER_QUOTA: 503,
    ErrorCode.NO_ROUTE: 503,
    ErrorCode.INVALID_ROUTING: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 503,
    ErrorCode.TAMPERED: 503,
    ErrorCode.UNKNOWN_SESSION: 503,
    ErrorCode.SEALED: 503,
    ErrorCode.INTERNAL: 503,
}

KEYS_NOT_FOUND_MESSAGE: Final = "one or more keys specified are not found on KME"


def etsi014_error(exc: KmstnError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, Error body) for a failure on the northbound 014 API."""
    status = ETSI014_STATUS[exc.code]
    if exc.code is ErrorCode.INTERNAL:
        message = "internal error"
    elif exc.code is ErrorCode.KEY_NOT_FOUND:
        message = KEYS_NOT_FOUND_MESSAGE  # ETSI 014 5.4, the exact text
    else:
        message = exc.public
    return status, {"message": message}


def etsi014_headers(exc: KmstnError) -> dict[str, str]:
    """Headers beside the Error body: ``Retry-After`` (RFC 9110 10.2.3, delay in
    seconds) on a 503 that says when key or quota is expected back."""
    if exc.retry_after_s is None or ETSI014_STATUS[exc.code] != 503:
        return {}
    return {"Retry-After": str(max(1, exc.retry_after_s))}


# -- ETSI GS QKD 020 ---------------------------------------------------------

PROBLEM_BASE: Final = "https://qkd.etsi.org/gs020-interop-kms/"


@dataclass(frozen=True, slots=True)
class Etsi020Problem:
    status: int
    slug: str  # problem type, appended to PROBLEM_BASE
    title: str
    details_key: str


# Default problem for each code; a KmstnError.reason refines it (below).
_ETSI020_BY_CODE: Final[dict[ErrorCode, Etsi020Problem]] = {
    ErrorCode.INVALID_ARGUMENT: Etsi020Problem(400, "missing-parameters", "bad request",
                                               "missing_parameters"),
    ErrorCode.SIZE_NOT_MULTIPLE_OF_8: Etsi020Problem(400, "missing-parameters", "bad request",
                                                     "missing_parameters"),
    ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION: Etsi020Problem(
        503, "unsupported-mandatory-extension", "unsupported mandatory extension",
        "unsupported_mandatory_extension"),
    ErrorCode.UNSATISFIED_MANDATORY_EXTENSION: Etsi020Problem(
        503, "unsupported-mandatory-extension", "unsupported mandatory extension",
        "unsupported_mandatory_extension"),
    ErrorCode.UNKNOWN_SAE: Etsi020Problem(400, "key-routing-error", "key routing error",
                                          "target_sae_id_not_recognized"),
    ErrorCode.UNKNOWN_NODE: Etsi020Problem(400, "key-routing-error", "key routing error",
                                           "target_sae_id_not_recognized"),
    ErrorCode.INVALID_ROUTING: Etsi020Problem(400, "key-routing-error", "key routing error",
                                              "invalid_routing"),
    ErrorCode.KEY_NOT_FOUND: Etsi020Problem(400, "key-not-present", "key not present",
                                            "key_not_present"),
    ErrorCode.KEY_CONFLICT: Etsi020Problem(400, "key-id-conflict", "key ID conflict",
                                           "key_id_conflict"),
    # A sealed envelope that fails to open was kept nowhere (rule 6.2), so
    # 400: the sender may resend with a fresh session.
    ErrorCode.TAMPERED: Etsi020Problem(400, "envelope-rejected", "envelope rejected",
                                       "envelope_rejected"),
    ErrorCode.UNKNOWN_SESSION: Etsi020Problem(400, "envelope-rejected", "envelope rejected",
                                              "unknown_session"),
    ErrorCode.PERMISSION_DENIED: Etsi020Problem(401, "unauthorized", "unauthorized",
                                                "unauthorized"),
    ErrorCode.UNAUTHENTICATED: Etsi020Problem(401, "unauthorized", "unauthorized",
                                              "unauthorized"),
    ErrorCode.INSUFFICIENT_KEY: Etsi020Problem(503, "insufficient-key-material",
                                               "insufficient key material",
                                               "insufficient_key_material"),
    ErrorCode.OVER_QUOTA: Etsi020Problem(503, "insufficient-key-material",
                                         "insufficient key material",
                                         "insufficient_key_material"),
    ErrorCode.NO_ROUTE: Etsi020Problem(503, "key-routing-error", "key routing error",
                                       "no_known_route"),
    ErrorCode.TIMEOUT: Etsi020Problem(503, "server-side-general-error", "server-side error",
                                      "timeout"),
    ErrorCode.UNAVAILABLE: Etsi020Problem(503, "server-side-general-error", "server-side error",
                                          "server_side_general_error"),
    ErrorCode.SEALED: Etsi020Problem(503, "server-side-general-error", "server-side error",
                                     "server_side_general_error"),
    ErrorCode.INTERNAL: Etsi020Problem(503, "server-side-general-error", "server-side error",
                                       "server_side_general_error"),
}

_ETSI020_BY_REASON: Final[dict[str, Etsi020Problem]] = {
    "ack_not_understood": Etsi020Problem(400, "ack-not-understood", "ack not understood",
                                         "ack_not_understood"),
    "key_voiding_error": Etsi020Problem(400, "void-request-not-understood",
                                        "void request not understood", "key_voiding_error"),
    "no_all_confirmation": Etsi020Problem(400, "no-key-ids-or-confirmation",
                                          "no key IDs or confirmation", "no_all_confirmation"),
    "request_timeout": Etsi020Problem(408, "timeout", "timeout", "timeout"),
    "no_route_multiple_targets": Etsi020Problem(503, "key-routing-error", "key routing error",
                                                "no_route_multiple_targets"),
    "synchronous_mode_unsupported": Etsi020Problem(400, "missing-parameters", "bad request",
                                                   "missing_parameters"),
}


def etsi020_problem(exc: KmstnError) -> tuple[int, bytes]:
    """(HTTP status, problem+json body) for a failure on the 020 API (RFC 9457)."""
    problem = (_ETSI020_BY_REASON.get(exc.reason or "") or _ETSI020_BY_CODE[exc.code])
    message = "internal error" if exc.code is ErrorCode.INTERNAL else exc.public
    details = {problem.details_key: message}
    if problem.details_key == "no_all_confirmation":
        # The spec's prose and its example disagree on the key; send both.
        details["no_key_ids_or_confirmation"] = message
    body = {
        "type": PROBLEM_BASE + problem.slug,
        "status": problem.status,
        "title": problem.title,
        "details": details,
    }
    return problem.status, json.dumps(body, separators=(",", ":")).encode()


# -- SKIP (draft-cisco-skip-02) -------------------------------------------------

# The ETSI 014 table, except that an unknown or already taken key ID is the
# draft's 404 (SKIP has one, ETSI 014 has not).
SKIP_STATUS: Final[dict[ErrorCode, int]] = {**ETSI014_STATUS, ErrorCode.KEY_NOT_FOUND: 404}
SKIP_KEY_NOT_FOUND: Final = "keyId not found for this system"


def skip_error(exc: KmstnError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, ``{"message": ...}``) for a failure on the SKIP API."""
    if exc.code is ErrorCode.INTERNAL:
        message = "internal error"
    elif exc.code is ErrorCode.KEY_NOT_FOUND:
        message = SKIP_KEY_NOT_FOUND  # reveals nothing about other systems' keys
    else:
        message = exc.public
    return SKIP_STATUS[exc.code], {"message": message}


# -- refusals made below the application --------------------------------------------

_REASONS: Final = {400: "Bad Request", 401: "Unauthorized", 408: "Request Timeout",
                   503: "Service Unavailable"}


RefusalKind = Literal["bad", "timeout", "server"]


def refusal_response(api: str, message: str, kind: RefusalKind, method: str,
                     request_id: str) -> bytes:
    """The whole HTTP answer to a request refused before it reached the application.

    The edge (gateway/edge.py) and the servers behind it refuse malformed,
    oversized and stalled requests with this, so they get the same ETSI
    status and body as any other bad request. ``kind`` is ``bad`` (the
    client's mistake), ``timeout`` (not received in time) or ``server`` (a
    failure of ours). ETSI 014 answers 400, or 503 for ``server``, with the
    Error body (014 defines no 408 or 413); ETSI 020 answers problem
    details, with 408 ``timeout`` for a request not received in time (ETSI
    020 clause 5.5). The connection closes: where a next request would start
    is unknown.
    """
    code = {"timeout": ErrorCode.TIMEOUT, "server": ErrorCode.INTERNAL}.get(
        kind, ErrorCode.INVALID_ARGUMENT)
    if api == "etsi014":
        code = ErrorCode.INVALID_ARGUMENT if kind == "timeout" else code
        status, body014 = etsi014_error(KmstnError(code, message))
        body = json.dumps(body014, separators=(",", ":")).encode()
    else:
        reason = "request_timeout" if kind == "timeout" else None
        status, body = etsi020_problem(KmstnError(code, message, reason=reason))
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            f"X-Request-ID: {request_id}\r\n"
            "Connection: close\r\n\r\n").encode("latin-1")
    # RFC 9110 9.3.2: an answer to HEAD has no content (the edge refuses HEAD,
    # but a server behind it may answer one).
    return head if method == "HEAD" else head + body
