"""ETSI 014 shared parts: the media type, the spec's literal messages, the Error of
clause 4.5 (rendered and read), and the strict JSON reading every body goes through."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from kme.errors import ErrorCode, KmstnError

MEDIA_TYPE: Final = "application/json"

# The literal messages ETSI GS QKD 014 V1.1.1 defines (clauses 4.2 and 5.4).
MSG_SIZE_NOT_MULTIPLE_OF_8: Final = "size shall be a multiple of 8"
MSG_KEYS_NOT_FOUND: Final = "one or more keys specified are not found on KME"
MSG_EXT_MANDATORY_UNSUPPORTED: Final = "not all extension_mandatory parameters are supported"
MSG_EXT_MANDATORY_UNMET: Final = "not all extension_mandatory request options could be met"
MSG_EXT_OPTIONAL_UNHANDLED: Final = "not all extension_optional request options handled"
# Our own texts for conditions the spec names but gives no message for.
MSG_INSUFFICIENT_KEY: Final = "not enough key material stored to serve this request"
MSG_UNAUTHORIZED: Final = "this SAE is not authorized for this request"


class Etsi014Error(KmstnError):
    """A KmstnError that may carry the ETSI 014 Error ``details`` array (clause 4.5)."""

    def __init__(self, code: ErrorCode, public: str, *, cause: str | None = None,
                 details: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(code, public, cause=cause)
        self.details: tuple[dict[str, Any], ...] | None = (
            tuple(dict(d) for d in details) if details else None)


def bad(message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT, *,
         details: Sequence[Mapping[str, Any]] | None = None) -> Etsi014Error:
    return Etsi014Error(code, message, details=details)


def keys_not_found(cause: str | None = None) -> Etsi014Error:
    """ETSI 014 clause 5.4: the 400 for unknown, consumed or foreign key IDs."""
    return Etsi014Error(ErrorCode.KEY_NOT_FOUND, MSG_KEYS_NOT_FOUND, cause=cause)


def insufficient_key(cause: str | None = None) -> Etsi014Error:
    """Spec note 5.8 [rec]: a valid request that the stored keys cannot serve -> 503."""
    return Etsi014Error(ErrorCode.INSUFFICIENT_KEY, MSG_INSUFFICIENT_KEY, cause=cause)


def permission_denied(cause: str | None = None) -> Etsi014Error:
    """Clause 5.3 / rule 5.3 of the note: the caller is not a slave of the key -> 401."""
    return Etsi014Error(ErrorCode.PERMISSION_DENIED, MSG_UNAUTHORIZED, cause=cause)


def shown(name: object) -> str:
    """A caller-supplied name, safe to echo in a public message."""
    if isinstance(name, str) and len(name) <= 64 and name.isprintable():
        return repr(name)
    return "<name>"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise bad(f"field {shown(k)} appears twice in one object")
        obj[k] = v
    return obj


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("request body is not valid UTF-8 JSON") from None


def error_body(message: str, details: Sequence[Mapping[str, Any]] | None = None
               ) -> dict[str, Any]:
    """Error (clause 4.5): a string ``message`` and optional ``details`` objects."""
    out: dict[str, Any] = {"message": message}
    if details:
        out["details"] = [dict(d) for d in details]
    return out


def parse_error_body(body: bytes) -> tuple[str | None, tuple[dict[str, Any], ...]]:
    """(message, details) of an Error (clause 4.5); (None, ()) if it is not one.

    Lenient on purpose: a client must cope with an empty 401 (spec note
    section 6) and with vendors that send plain text.
    """
    try:
        obj = json.loads(body.decode("utf-8")) if body.strip() else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, ()
    if not isinstance(obj, dict):
        return None, ()
    message = obj.get("message")
    details = obj.get("details")
    return (message if isinstance(message, str) else None,
            tuple(d for d in details if isinstance(d, dict)) if isinstance(details, list)
            else ())
