"""ETSI GS QKD 014 V1.1.1 messages: parsing, validation and JSON, transport-neutral.

One module holds the 014 rules (clauses 4 and 5 of the spec, sections 4, 5
and 7 of the spec note ``spec/etsi-gs-qkd-014.md``) for every side that
speaks 014: the node's northbound gateway, the QKD device emulator
(``kme.qkdsim``) and the southbound client (``kme.qkd``). Nothing here does
I/O or logs.

Server side::

    limits = KeyLimits(key_size=256, min_key_size=64, max_key_size=1024,
                       max_key_per_request=128, max_sae_id_count=0)
    req = parse_key_request_body(body, limits)      # or parse_key_request_query(args, limits)
    check_slaves(master, slave, req, limits)        # the [rec] checks of note 5.7
    ... take keys ...
    body = key_container(keys)

Client side: :func:`key_request_body`, :func:`key_ids_body`,
:func:`parse_key_container_body`, :func:`parse_status_body`.

Errors raise :class:`Etsi014Error` (a :class:`KmstnError`) whose ``code``
decides the HTTP status (``gateway/errors.py`` holds the one table) and whose
``public`` text is the exact ETSI message where the spec defines one
(``size shall be a multiple of 8``, ``one or more keys specified are not
found on KME``, ...). ``details`` is the optional Error ``details`` array.

Choices where the spec is silent (spec note section 6):

- ``number`` and ``size`` must be integers (JSON numbers with no fraction, or
  decimal digits in a query string); ``null`` counts as absent, as generated
  clients send it for unset fields.
- Unknown fields in a Key request or Key IDs body are refused (400): a typo
  such as ``numbr`` must not silently become the default of one key.
- ``extension_mandatory`` / ``extension_optional`` are accepted as an array
  of name/value objects (the spec) or as one plain object (nanoy42's client
  and others); a plain object is split into one-entry objects.
- The GET form of enc_keys takes only ``number`` and ``size``, each at most
  once; the GET form of dec_keys takes exactly one ``key_ID``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kme.errors import ErrorCode, KmstnError
from kme.types import Key, SecretBytes, b64decode_strict, parse_key_id, sae_id

__all__ = [
    "MAX_KEY_IDS",
    "MEDIA_TYPE",
    "MSG_EXT_MANDATORY_UNMET",
    "MSG_EXT_MANDATORY_UNSUPPORTED",
    "MSG_EXT_OPTIONAL_UNHANDLED",
    "MSG_INSUFFICIENT_KEY",
    "MSG_KEYS_NOT_FOUND",
    "MSG_SIZE_NOT_MULTIPLE_OF_8",
    "MSG_UNAUTHORIZED",
    "Etsi014Error",
    "KeyLimits",
    "KeyRequest",
    "Status",
    "check_extensions",
    "check_slaves",
    "error_body",
    "extension_names",
    "insufficient_key",
    "key_container",
    "key_ids_body",
    "key_request_body",
    "keys_not_found",
    "parse_error_body",
    "parse_key_container_body",
    "parse_key_ids_body",
    "parse_key_ids_query",
    "parse_key_request_body",
    "parse_key_request_query",
    "parse_status_body",
    "path_sae_id",
    "permission_denied",
    "status_body",
]

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

# A dec_keys request naming more IDs than this is refused before any lookup.
MAX_KEY_IDS: Final = 1024
# Extension entries per request: enough for any real use, bounded work.
MAX_EXTENSIONS: Final = 64

_KEY_REQUEST_FIELDS: Final = frozenset({
    "number", "size", "additional_slave_SAE_IDs", "extension_mandatory", "extension_optional",
})
_QUERY_INT_RE: Final = re.compile(r"-?[0-9]{1,18}")
_STATUS_STR_FIELDS: Final = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
_STATUS_INT_FIELDS: Final = ("key_size", "stored_key_count", "max_key_count",
                             "max_key_per_request", "max_key_size", "min_key_size",
                             "max_SAE_ID_count")


class Etsi014Error(KmstnError):
    """A KmstnError that may carry the ETSI 014 Error ``details`` array (clause 4.5)."""

    def __init__(self, code: ErrorCode, public: str, *, cause: str | None = None,
                 details: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(code, public, cause=cause)
        self.details: tuple[dict[str, Any], ...] | None = (
            tuple(dict(d) for d in details) if details else None)


def _bad(message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT, *,
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


def _shown(name: object) -> str:
    """A caller-supplied name, safe to echo in a public message."""
    if isinstance(name, str) and len(name) <= 64 and name.isprintable():
        return repr(name)
    return "<name>"


# -- limits and requests --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What a KME serves for one master/slave pair (the Status fields that bound requests)."""

    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int
    max_sae_id_count: int
    # ETSI 014 clause 4.2: a KME that serves whole bytes only answers any
    # other size with 400 "size shall be a multiple of 8".
    bytes_only: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("need 1 <= min_key_size <= key_size <= max_key_size")
        if self.max_key_per_request < 1 or self.max_sae_id_count < 0:
            raise ValueError("need max_key_per_request >= 1 and max_sae_id_count >= 0")


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """A validated Key request (clause 4.2) with the defaults filled in."""

    number: int = 1
    size: int = 256
    additional_slave_sae_ids: tuple[str, ...] = ()
    extension_mandatory: tuple[dict[str, Any], ...] = ()
    extension_optional: tuple[dict[str, Any], ...] = ()


def _query_int(values: Sequence[str], name: str, what: str) -> int:
    if len(values) != 1:
        raise _bad(f"{name} must be given once")
    text = values[0].strip()
    if not _QUERY_INT_RE.fullmatch(text):
        raise _bad(f"{name} must be {what}")
    return int(text)


def _json_int(value: object, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be {what}")
    return value


def _number(value: int, limits: KeyLimits) -> int:
    # Spec note 5.6 [rec]: number from 1 to max_key_per_request.
    if not 1 <= value <= limits.max_key_per_request:
        raise _bad(f"number must be an integer from 1 to {limits.max_key_per_request}")
    return value


def _size(value: int, limits: KeyLimits) -> int:
    # Positive first, then the clause 4.2 multiple-of-8 rule (it has an exact
    # message, so it wins over the range check), then the note 5.6 range.
    if value <= 0:
        raise _bad(f"size must be an integer from {limits.min_key_size} to "
                   f"{limits.max_key_size}")
    if limits.bytes_only and value % 8:
        raise _bad(MSG_SIZE_NOT_MULTIPLE_OF_8, ErrorCode.SIZE_NOT_MULTIPLE_OF_8)
    if not limits.min_key_size <= value <= limits.max_key_size:
        raise _bad(f"size must be an integer from {limits.min_key_size} to "
                   f"{limits.max_key_size}")
    return value


def _number_text(limits: KeyLimits) -> str:
    return f"an integer from 1 to {limits.max_key_per_request}"


def _size_text(limits: KeyLimits) -> str:
    return f"an integer from {limits.min_key_size} to {limits.max_key_size}"


def parse_key_request_query(args: Mapping[str, Sequence[str]], limits: KeyLimits, *,
                            supported_extensions: Collection[str] = ()) -> KeyRequest:
    """The GET form of Get key (clause 5.2): only ``number`` and ``size``, each once.

    ``args`` maps each query parameter to all its values, as
    ``urllib.parse.parse_qs(query, keep_blank_values=True)`` or Flask's
    ``request.args.to_dict(flat=False)`` give it. ``supported_extensions`` is
    accepted for symmetry with the POST form; the GET form carries none.
    """
    del supported_extensions
    extra = sorted(set(args) - {"number", "size"})
    if extra:
        raise _bad(f"query parameter {_shown(extra[0])} is not allowed: the GET form of "
                   "enc_keys takes only number and size; POST the other fields")
    number = 1
    if "number" in args:
        number = _number(_query_int(args["number"], "number", _number_text(limits)), limits)
    size = limits.key_size
    if "size" in args:
        size = _size(_query_int(args["size"], "size", _size_text(limits)), limits)
    return KeyRequest(number=number, size=size)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise _bad(f"field {_shown(k)} appears twice in one object")
        obj[k] = v
    return obj


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("request body is not valid UTF-8 JSON") from None


def _extensions(value: object, name: str) -> tuple[dict[str, Any], ...]:
    """Array of name/value objects (clause 4.2), or one plain object (note section 6)."""
    if value is None:
        return ()
    if isinstance(value, dict):
        items = [{k: v} for k, v in value.items()]
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        items = [dict(v) for v in value]
    else:
        raise _bad(f"{name} must be an array of objects (name/value pairs)")
    if len(items) > MAX_EXTENSIONS:
        raise _bad(f"{name} has more than {MAX_EXTENSIONS} entries")
    return tuple(items)


def extension_names(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The names in a list of extension name/value objects, in order, once each."""
    seen: dict[str, None] = {}
    for entry in entries:
        for name in entry:
            seen.setdefault(name, None)
    return list(seen)


def check_extensions(req: KeyRequest, supported: Collection[str] = ()) -> None:
    """Clause 4.2: every extension_mandatory entry must be one this KME implements.

    An unsupported one is a 400 with the spec's message and a ``details``
    entry naming it; extension_optional entries are ignored (answered 200).
    """
    unsupported = [n for n in extension_names(req.extension_mandatory) if n not in supported]
    if unsupported:
        raise _bad(MSG_EXT_MANDATORY_UNSUPPORTED, ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION,
                   details=[{"extension_mandatory_unsupported": f"{_shown(n)} is not supported"}
                            for n in unsupported[:8]])


def parse_key_request_body(body: bytes, limits: KeyLimits, *,
                           supported_extensions: Collection[str] = ()) -> KeyRequest:
    """The POST form of Get key (clause 5.2, Key request of clause 4.2).

    A zero-byte body and ``{}`` both mean "one key of the default size".
    Mandatory extensions not in ``supported_extensions`` are refused (400,
    ``not all extension_mandatory parameters are supported``); optional ones
    are kept in the result and may be ignored.
    """
    if not body.strip():
        return KeyRequest(number=1, size=limits.key_size)
    obj = _load_json(body)
    if not isinstance(obj, dict):
        raise _bad("the Key request must be a JSON object")
    extra = sorted(set(obj) - _KEY_REQUEST_FIELDS)
    if extra:
        raise _bad(f"unknown field {_shown(extra[0])} in the Key request")
    number = 1
    if obj.get("number") is not None:
        number = _number(_json_int(obj["number"], "number", _number_text(limits)), limits)
    size = limits.key_size
    if obj.get("size") is not None:
        size = _size(_json_int(obj["size"], "size", _size_text(limits)), limits)
    slaves: tuple[str, ...] = ()
    raw = obj.get("additional_slave_SAE_IDs")
    if raw is not None:
        # Spec note 5.7 [rec]: an empty array is refused, not read as "none".
        if not isinstance(raw, list) or not raw:
            raise _bad("additional_slave_SAE_IDs must be a non-empty array of SAE IDs")
        try:
            slaves = tuple(sae_id(v) for v in raw)
        except KmstnError:
            raise _bad("additional_slave_SAE_IDs must hold SAE IDs (1-64 URI characters)"
                       ) from None
    req = KeyRequest(
        number=number,
        size=size,
        additional_slave_sae_ids=slaves,
        extension_mandatory=_extensions(obj.get("extension_mandatory"), "extension_mandatory"),
        extension_optional=_extensions(obj.get("extension_optional"), "extension_optional"),
    )
    check_extensions(req, supported_extensions)
    return req


def path_sae_id(value: str, role: str = "slave") -> str:
    """The (URL-decoded) SAE ID from the path; spec note 5.7: never empty or blank."""
    if not value.strip():
        raise _bad(f"the {role} SAE ID in the path must not be empty")
    try:
        return sae_id(value)
    except KmstnError:
        raise _bad(f"the {role} SAE ID in the path must be 1-64 URI characters") from None


def check_slaves(master: str, slave: str, req: KeyRequest, limits: KeyLimits) -> None:
    """Spec note 5.7 [rec]: the slave set of a Get key must make sense.

    Refused with 400: a path slave that is empty or equal to the master;
    duplicate additional slaves; an additional slave equal to the master or
    to the path slave; more additional slaves than ``max_SAE_ID_count``
    (any at all when it is 0). An empty array never reaches this point
    (:func:`parse_key_request_body` refuses it).
    """
    slave = path_sae_id(slave)
    if slave == master:
        raise _bad("the slave SAE ID must differ from the master SAE ID")
    extra = req.additional_slave_sae_ids
    if not extra:
        return
    if len(extra) > limits.max_sae_id_count:
        if limits.max_sae_id_count == 0:
            raise _bad("additional_slave_SAE_IDs is not supported: this KME does not "
                       "multicast keys (max_SAE_ID_count is 0)")
        raise _bad(f"additional_slave_SAE_IDs has more than {limits.max_sae_id_count} entries")
    if len(set(extra)) != len(extra):
        raise _bad("additional_slave_SAE_IDs has duplicate entries")
    if master in extra or slave in extra:
        raise _bad("additional_slave_SAE_IDs must not name the master or the path slave")


# -- key IDs ----------------------------------------------------------------------


def _key_id(value: object) -> uuid.UUID:
    try:
        return parse_key_id(value)
    except KmstnError:
        raise _bad("key_ID must be a UUID string") from None


def parse_key_ids_query(args: Mapping[str, Sequence[str]]) -> list[uuid.UUID]:
    """The GET form of Get key with key IDs (clause 5.3): exactly one ``key_ID``."""
    extra = sorted(set(args) - {"key_ID"})
    if extra:
        raise _bad(f"query parameter {_shown(extra[0])} is not allowed: the GET form of "
                   "dec_keys takes one key_ID; POST Key IDs for more")
    values = args.get("key_ID", ())
    if len(values) != 1:
        # Spec note section 6: repeated values are refused, never half-read.
        raise _bad("the GET form of dec_keys takes exactly one key_ID; POST Key IDs for more")
    return [_key_id(values[0])]


def parse_key_ids_body(body: bytes, *, max_ids: int = MAX_KEY_IDS) -> list[uuid.UUID]:
    """The POST form of Get key with key IDs: Key IDs of clause 4.4."""
    obj = _load_json(body) if body.strip() else None
    if not isinstance(obj, dict):
        raise _bad("the Key IDs body must be a JSON object with key_IDs")
    extra = sorted(set(obj) - {"key_IDs", "key_IDs_extension"})
    if extra:
        raise _bad(f"unknown field {_shown(extra[0])} in Key IDs")
    if not isinstance(obj.get("key_IDs_extension", {}), (dict, type(None))):
        raise _bad("key_IDs_extension must be an object")
    raw = obj.get("key_IDs")
    if not isinstance(raw, list) or not raw:
        raise _bad("key_IDs must be a non-empty array of {\"key_ID\": UUID} objects")
    if len(raw) > max_ids:
        raise _bad(f"key_IDs has more than {max_ids} entries")
    ids: list[uuid.UUID] = []
    for item in raw:
        if not isinstance(item, dict) or "key_ID" not in item:
            raise _bad("each key_IDs entry must be an object with a key_ID")
        if set(item) - {"key_ID", "key_ID_extension"}:
            raise _bad("key_IDs entries take only key_ID and key_ID_extension")
        if not isinstance(item.get("key_ID_extension", {}), (dict, type(None))):
            # Clause 4.4: an object (reserved for future use).
            raise _bad("key_ID_extension must be an object")
        ids.append(_key_id(item["key_ID"]))
    if len(set(ids)) != len(ids):
        raise _bad("key_IDs has duplicate entries")
    return ids


# -- rendering (server side) ---------------------------------------------------------


def key_container(keys: Sequence[Key]) -> dict[str, Any]:
    """Key container (clause 4.3): ``keys`` (lower case, as the spec's example)."""
    return {"keys": [{"key_ID": str(k.key_id), "key": k.material.b64()} for k in keys]}


@dataclass(frozen=True, slots=True)
class Status:
    """The Status of clause 4.1: the 11 mandatory fields and the optional extension."""

    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_sae_id_count: int
    status_extension: dict[str, Any] | None = None

    @classmethod
    def of(cls, *, source_kme_id: str, target_kme_id: str, master_sae_id: str,
           slave_sae_id: str, limits: KeyLimits, stored_key_count: int,
           max_key_count: int) -> Status:
        return cls(source_kme_id, target_kme_id, master_sae_id, slave_sae_id,
                   limits.key_size, stored_key_count, max_key_count,
                   limits.max_key_per_request, limits.max_key_size, limits.min_key_size,
                   limits.max_sae_id_count)

    @property
    def limits(self) -> KeyLimits:
        return KeyLimits(self.key_size, self.min_key_size, self.max_key_size,
                         self.max_key_per_request, self.max_sae_id_count)


def status_body(status: Status) -> dict[str, Any]:
    """The Status JSON object (clause 4.1), with the spec's field names."""
    out: dict[str, Any] = {
        "source_KME_ID": status.source_kme_id,
        "target_KME_ID": status.target_kme_id,
        "master_SAE_ID": status.master_sae_id,
        "slave_SAE_ID": status.slave_sae_id,
        "key_size": status.key_size,
        "stored_key_count": status.stored_key_count,
        "max_key_count": status.max_key_count,
        "max_key_per_request": status.max_key_per_request,
        "max_key_size": status.max_key_size,
        "min_key_size": status.min_key_size,
        "max_SAE_ID_count": status.max_sae_id_count,
    }
    if status.status_extension:
        out["status_extension"] = status.status_extension
    return out


def error_body(message: str, details: Sequence[Mapping[str, Any]] | None = None
               ) -> dict[str, Any]:
    """Error (clause 4.5): a string ``message`` and optional ``details`` objects."""
    out: dict[str, Any] = {"message": message}
    if details:
        out["details"] = [dict(d) for d in details]
    return out


# -- client side: requests out, answers in ------------------------------------------------


def key_request_body(req: KeyRequest) -> dict[str, Any]:
    """A Key request (clause 4.2) for POST enc_keys; extensions go out as arrays."""
    out: dict[str, Any] = {"number": req.number, "size": req.size}
    if req.additional_slave_sae_ids:
        out["additional_slave_SAE_IDs"] = list(req.additional_slave_sae_ids)
    if req.extension_mandatory:
        out["extension_mandatory"] = [dict(e) for e in req.extension_mandatory]
    if req.extension_optional:
        out["extension_optional"] = [dict(e) for e in req.extension_optional]
    return out


def key_ids_body(key_ids: Iterable[uuid.UUID]) -> dict[str, Any]:
    """Key IDs (clause 4.4) for POST dec_keys."""
    return {"key_IDs": [{"key_ID": str(k)} for k in key_ids]}


def parse_key_container_body(body: bytes, *, number: int | None = None,
                             size: int | None = None) -> list[Key]:
    """Read a Key container from a KME; check count and size when they are known.

    Raises INVALID_ARGUMENT naming what is wrong; the southbound client turns
    that into "the device answered badly" (its public text never includes
    the device's words).
    """
    obj = _load_json(body)
    if not isinstance(obj, dict) or not isinstance(obj.get("keys"), list):
        raise _bad("Key container has no keys array")
    keys: list[Key] = []
    seen: set[uuid.UUID] = set()
    for item in obj["keys"]:
        if not isinstance(item, dict):
            raise _bad("keys[] entries must be objects")
        key_id = _key_id(item.get("key_ID"))
        if key_id in seen:
            raise _bad("Key container repeats a key_ID")
        seen.add(key_id)
        try:
            material = b64decode_strict(item.get("key"))
        except KmstnError:
            raise _bad("keys[].key must be standard base64 (RFC 4648)") from None
        if not material:
            raise _bad("keys[].key must not be empty")
        bits = len(material) * 8
        if size is not None and (size + 7) // 8 != len(material):
            raise _bad(f"a key holds {bits} bits, {size} were asked for")
        keys.append(Key(key_id, SecretBytes(material), size if size is not None else bits))
    if number is not None and len(keys) != number:
        raise _bad(f"the Key container holds {len(keys)} keys, {number} were asked for")
    return keys


def parse_status_body(body: bytes) -> Status:
    """Read a Status (clause 4.1); every one of the 11 fields with its JSON type."""
    obj = _load_json(body)
    if not isinstance(obj, dict):
        raise _bad("Status must be a JSON object")
    for name in _STATUS_STR_FIELDS:
        if not isinstance(obj.get(name), str):
            raise _bad(f"Status field {name} must be a string")
    for name in _STATUS_INT_FIELDS:
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(f"Status field {name} must be a non-negative integer")
    ext = obj.get("status_extension")
    return Status(
        obj["source_KME_ID"], obj["target_KME_ID"], obj["master_SAE_ID"], obj["slave_SAE_ID"],
        obj["key_size"], obj["stored_key_count"], obj["max_key_count"],
        obj["max_key_per_request"], obj["max_key_size"], obj["min_key_size"],
        obj["max_SAE_ID_count"], ext if isinstance(ext, dict) else None)


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
