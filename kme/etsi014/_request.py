"""ETSI 014 Key request (clause 4.2): Get key in its GET and POST forms (clause 5.2),
the slave checks of spec note 5.7, and the body a client sends."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kme.errors import ErrorCode, KmstnError
from kme.etsi014._common import (
    MSG_EXT_MANDATORY_UNSUPPORTED,
    MSG_SIZE_NOT_MULTIPLE_OF_8,
    bad,
    load_json,
    shown,
)
from kme.etsi014._status import KeyLimits
from kme.types import sae_id

# Extension entries per request: enough for any real use, bounded work.
MAX_EXTENSIONS: Final = 64

_KEY_REQUEST_FIELDS: Final = frozenset({
    "number", "size", "additional_slave_SAE_IDs", "extension_mandatory", "extension_optional",
})
_QUERY_INT_RE: Final = re.compile(r"-?[0-9]{1,18}")


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
        raise bad(f"{name} must be given once")
    text = values[0].strip()
    if not _QUERY_INT_RE.fullmatch(text):
        raise bad(f"{name} must be {what}")
    return int(text)


def _json_int(value: object, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be {what}")
    return value


def _number(value: int, limits: KeyLimits) -> int:
    # Spec note 5.6 [rec]: number from 1 to max_key_per_request.
    if not 1 <= value <= limits.max_key_per_request:
        raise bad(f"number must be an integer from 1 to {limits.max_key_per_request}")
    return value


def _size(value: int, limits: KeyLimits) -> int:
    # Positive first, then the clause 4.2 multiple-of-8 rule (it has an exact
    # message, so it wins over the range check), then the note 5.6 range.
    if value <= 0:
        raise bad(f"size must be an integer from {limits.min_key_size} to "
                   f"{limits.max_key_size}")
    if limits.bytes_only and value % 8:
        raise bad(MSG_SIZE_NOT_MULTIPLE_OF_8, ErrorCode.SIZE_NOT_MULTIPLE_OF_8)
    if not limits.min_key_size <= value <= limits.max_key_size:
        raise bad(f"size must be an integer from {limits.min_key_size} to "
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
        raise bad(f"query parameter {shown(extra[0])} is not allowed: the GET form of "
                   "enc_keys takes only number and size; POST the other fields")
    number = 1
    if "number" in args:
        number = _number(_query_int(args["number"], "number", _number_text(limits)), limits)
    size = limits.key_size
    if "size" in args:
        size = _size(_query_int(args["size"], "size", _size_text(limits)), limits)
    return KeyRequest(number=number, size=size)


def _extensions(value: object, name: str, *, ignorable: bool = False
                ) -> tuple[dict[str, Any], ...]:
    """Array of name/value objects (clause 4.2), or one plain object (note section 6).

    ``ignorable``: an optional extension of any other shape is dropped, as the
    KME may ignore it (clause 4.2), instead of refused.
    """
    if value is None:
        return ()
    if ignorable and not (isinstance(value, dict) or (
            isinstance(value, list) and all(isinstance(v, dict) for v in value))):
        return ()
    if isinstance(value, dict):
        items = [{k: v} for k, v in value.items()]
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        items = [dict(v) for v in value]
    else:
        raise bad(f"{name} must be an array of objects (name/value pairs)")
    if len(items) > MAX_EXTENSIONS:
        raise bad(f"{name} has more than {MAX_EXTENSIONS} entries")
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
        raise bad(MSG_EXT_MANDATORY_UNSUPPORTED, ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION,
                   details=[{"extension_mandatory_unsupported": f"{shown(n)} is not supported"}
                            for n in unsupported[:8]])


def parse_key_request_body(body: bytes, limits: KeyLimits, *,
                           supported_extensions: Collection[str] = (),
                           lenient: bool = False) -> KeyRequest:
    """The POST form of Get key (clause 5.2, Key request of clause 4.2).

    A zero-byte body and ``{}`` both mean "one key of the default size".
    Mandatory extensions not in ``supported_extensions`` are refused (400,
    ``not all extension_mandatory parameters are supported``); optional ones
    are kept in the result and may be ignored. ``lenient``: an
    ``extension_optional`` of another shape is ignored (module docstring).
    """
    if not body.strip():
        return KeyRequest(number=1, size=limits.key_size)
    obj = load_json(body)
    if not isinstance(obj, dict):
        raise bad("the Key request must be a JSON object")
    extra = sorted(set(obj) - _KEY_REQUEST_FIELDS)
    if extra:
        raise bad(f"unknown field {shown(extra[0])} in the Key request")
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
            raise bad("additional_slave_SAE_IDs must be a non-empty array of SAE IDs")
        try:
            slaves = tuple(sae_id(v) for v in raw)
        except KmstnError:
            raise bad("additional_slave_SAE_IDs must hold SAE IDs (1-64 URI characters)"
                       ) from None
    req = KeyRequest(
        number=number,
        size=size,
        additional_slave_sae_ids=slaves,
        extension_mandatory=_extensions(obj.get("extension_mandatory"), "extension_mandatory"),
        extension_optional=_extensions(obj.get("extension_optional"), "extension_optional",
                                       ignorable=lenient),
    )
    check_extensions(req, supported_extensions)
    return req


def path_sae_id(value: str, role: str = "slave") -> str:
    """The (URL-decoded) SAE ID from the path; spec note 5.7: never empty or blank."""
    if not value.strip():
        raise bad(f"the {role} SAE ID in the path must not be empty")
    try:
        return sae_id(value)
    except KmstnError:
        raise bad(f"the {role} SAE ID in the path must be 1-64 URI characters") from None


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
        raise bad("the slave SAE ID must differ from the master SAE ID")
    extra = req.additional_slave_sae_ids
    if not extra:
        return
    if len(extra) > limits.max_sae_id_count:
        if limits.max_sae_id_count == 0:
            raise bad("additional_slave_SAE_IDs is not supported: this KME does not "
                       "multicast keys (max_SAE_ID_count is 0)")
        raise bad(f"additional_slave_SAE_IDs has more than {limits.max_sae_id_count} entries")
    if len(set(extra)) != len(extra):
        raise bad("additional_slave_SAE_IDs has duplicate entries")
    if master in extra or slave in extra:
        raise bad("additional_slave_SAE_IDs must not name the master or the path slave")


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



def read_key_request(method: str, args: Mapping[str, Sequence[str]], body: bytes,
                     limits: KeyLimits, *, supported_extensions: Collection[str] = ()
                     ) -> KeyRequest:
    """Get key (clause 5.2) as the northbound gateway reads it: GET or POST, lenient.

    GET reads the query; POST reads the body, or, with no body, a query of
    ``number``/``size`` like the GET form (a client that POSTs ``?number=5``
    must not silently get one key); a POST with both is 400.
    """
    if method == "GET" or (not body.strip() and args):
        return parse_key_request_query(args, limits)
    if args:
        raise bad("a POST to enc_keys carries its Key request in the body or in the query "
                  "string, not in both")
    return parse_key_request_body(body, limits, supported_extensions=supported_extensions,
                                  lenient=True)
