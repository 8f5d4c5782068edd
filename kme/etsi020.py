"""ETSI GS QKD 020 V1.1.1 messages: parsing, validation and JSON, transport-neutral.

Used by the ETSI 020 listener (requests from peers), by the flows (messages
this node sends) and by the relay (acks to callback URLs). Field names and
rules follow the published OpenAPI (clause 5 of the spec note):

- ``ext_key_container`` (5.1): keys, initiator_sae_id, target_sae_ids,
  optional ack_callback_url (present = asynchronous, absent = synchronous),
  extension_mandatory / extension_optional (objects).
- ``ack_containers`` (5.2): a JSON array of ack_container; one container
  groups keys sharing ack_status, initiator and targets.
- ``void_container`` (5.3): key_ids as UUID strings; ``[]`` means all keys of
  that SAE set and needs ``all_confirmation: true``.

Parsing errors raise :class:`KmstnError` with code INVALID_ARGUMENT and a
``reason`` naming the ETSI problem-details key (``missing_parameters``,
``ack_not_understood``, ...); gateway/errors.py turns that into RFC 9457
problem details. Nothing here logs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from kme.errors import ErrorCode, KmstnError
from kme.types import SecretBytes, b64decode_strict, parse_key_id, sae_id

__all__ = [
    "ACK_STATUSES",
    "CAPABILITIES",
    "MEDIA_TYPE",
    "SEALED_MEDIA_TYPE",
    "VERSIONS",
    "AckContainer",
    "ExtKey",
    "ExtKeyContainer",
    "VoidContainer",
    "acks_json",
    "ext_keys_json",
    "parse_acks",
    "parse_ext_keys",
    "parse_void",
    "void_json",
]

MEDIA_TYPE: Final = "application/json"
# A body sealed in the kmstn relay envelope (see relay/envelope.py). The
# 020 endpoints tell it apart from plain ETSI 020 JSON by this media type.
SEALED_MEDIA_TYPE: Final = "application/vnd.kmstn.sealed+json"
VERSIONS: Final = ("v1",)
CAPABILITIES: Final = ("synchronous_mode",)
ACK_STATUSES: Final = ("relayed", "failed", "voided", "failed to void", "key not present")
MAX_URL: Final = 1024
MAX_MESSAGE: Final = 4096
MAX_ACK_CONTAINERS: Final = 1024
MAX_KEYS: Final = 1024


def _bad(reason: str, message: str) -> KmstnError:
    return KmstnError(ErrorCode.INVALID_ARGUMENT, message, reason=reason)


def _load(body: bytes, reason: str) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(reason, "body is not valid UTF-8 JSON") from None


def _obj(value: Any, what: str, reason: str = "missing_parameters") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(reason, f"{what} must be a JSON object")
    return value


def _require(obj: dict[str, Any], name: str) -> Any:
    if name not in obj or obj[name] is None:
        raise _bad("missing_parameters", f"{name} is required")
    return obj[name]


def _sae(value: Any, name: str) -> str:
    try:
        return sae_id(value)
    except KmstnError:
        raise _bad("missing_parameters",
                   f"{name} must be 1-64 characters permitted in a URI") from None


def _saes(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _bad("missing_parameters", f"{name} must be a non-empty array of SAE IDs")
    out = tuple(_sae(v, name) for v in value)
    if len(set(out)) != len(out):
        raise _bad("missing_parameters", f"{name} has duplicate entries")
    return out


def _uuid(value: Any, name: str, reason: str = "missing_parameters") -> uuid.UUID:
    try:
        return parse_key_id(value)
    except KmstnError:
        raise _bad(reason, f"{name} must be a UUID string") from None


def _extension(obj: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 1024:
        raise _bad("missing_parameters", f"{name} must be an object of at most 1024 properties")
    if not value and name == "extension_mandatory":
        # Spec note 5.1: minProperties is 1. An empty extension_optional is read
        # as none (lenient: it asks nothing); an empty extension_mandatory is
        # refused, since a sender that means "no extension" omits it.
        raise _bad("missing_parameters", "extension_mandatory must not be empty; omit it")
    return value or None


def _callback(obj: dict[str, Any]) -> str | None:
    url = obj.get("ack_callback_url")
    if url is None:
        return None
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise _bad("missing_parameters",
                   "ack_callback_url must be a URI of at most 1024 characters")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise _bad("missing_parameters", "ack_callback_url must be an https:// URL")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise _bad("missing_parameters", "ack_callback_url has an invalid port") from None
    return url


@dataclass(frozen=True, slots=True)
class ExtKey:
    key_id: uuid.UUID
    value: SecretBytes
    extension: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ExtKeyContainer:
    keys: tuple[ExtKey, ...]
    initiator_sae_id: str
    target_sae_ids: tuple[str, ...]
    ack_callback_url: str | None = None
    extension_mandatory: dict[str, Any] | None = None
    extension_optional: dict[str, Any] | None = None

    @property
    def key_ids(self) -> tuple[uuid.UUID, ...]:
        return tuple(k.key_id for k in self.keys)


@dataclass(frozen=True, slots=True)
class AckContainer:
    key_ids: tuple[uuid.UUID, ...]
    ack_status: str
    initiator_sae_id: str
    target_sae_ids: tuple[str, ...]
    message: str | None = None
    extension: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class VoidContainer:
    key_ids: tuple[uuid.UUID, ...]
    initiator_sae_id: str
    target_sae_ids: tuple[str, ...]
    ack_callback_url: str | None = None
    all_confirmation: bool = False
    extension: dict[str, Any] | None = field(default=None)


def parse_ext_keys(body: bytes) -> ExtKeyContainer:
    """Parse and validate an ext_key_container (spec note 5.1, checklist 9)."""
    obj = _obj(_load(body, "missing_parameters"), "ext_key_container")
    raw_keys = _require(obj, "keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise _bad("missing_parameters", "keys must be a non-empty array")
    if len(raw_keys) > MAX_KEYS:
        raise _bad("missing_parameters", f"at most {MAX_KEYS} keys per request")
    keys = []
    seen: set[uuid.UUID] = set()
    for raw in raw_keys:
        item = _obj(raw, "keys[]")
        key_id = _uuid(_require(item, "key_id"), "key_id")
        if key_id in seen:
            raise _bad("missing_parameters", "keys has a duplicate key_id")
        seen.add(key_id)
        value = _require(item, "value")
        try:
            material = b64decode_strict(value)
        except KmstnError:
            raise _bad("missing_parameters", "value must be standard base64 (RFC 4648)") from None
        if not material:
            raise _bad("missing_parameters", "value must not be empty")
        ext = item.get("extension")
        if ext is not None and not isinstance(ext, dict):
            raise _bad("missing_parameters", "keys[].extension must be an object")
        keys.append(ExtKey(key_id, SecretBytes(material), ext or None))
    return ExtKeyContainer(
        keys=tuple(keys),
        initiator_sae_id=_sae(_require(obj, "initiator_sae_id"), "initiator_sae_id"),
        target_sae_ids=_saes(_require(obj, "target_sae_ids"), "target_sae_ids"),
        ack_callback_url=_callback(obj),
        extension_mandatory=_extension(obj, "extension_mandatory"),
        extension_optional=_extension(obj, "extension_optional"),
    )


def ext_keys_json(c: ExtKeyContainer) -> bytes:
    out: dict[str, Any] = {
        "keys": [
            {"key_id": str(k.key_id), "value": k.value.b64(),
             **({"extension": k.extension} if k.extension else {})}
            for k in c.keys
        ],
        "initiator_sae_id": c.initiator_sae_id,
        "target_sae_ids": list(c.target_sae_ids),
    }
    if c.ack_callback_url:
        out["ack_callback_url"] = c.ack_callback_url
    if c.extension_mandatory:
        out["extension_mandatory"] = c.extension_mandatory
    if c.extension_optional:
        out["extension_optional"] = c.extension_optional
    return json.dumps(out, separators=(",", ":")).encode()


def parse_acks(body: bytes, allow_empty: bool = False) -> list[AckContainer]:
    """Parse ack_containers (5.2); a single object is accepted leniently (spec note 7).

    ``allow_empty``: a synchronous answer to an all-keys void that found
    nothing may be ``[]``; an ack sent on its own never is.
    """
    data = _load(body, "ack_not_understood")
    if isinstance(data, dict):
        data = [data]
    if (not isinstance(data, list) or (not data and not allow_empty)
            or len(data) > MAX_ACK_CONTAINERS):
        raise _bad("ack_not_understood", "ack_containers must be a non-empty JSON array")
    acks = []
    for raw in data:
        obj = _obj(raw, "ack_container", "ack_not_understood")
        # Pre-publication drafts named the list "key_ids" (spec note 7).
        container = obj.get("key_id_container", obj.get("key_ids"))
        if not isinstance(container, list) or not container or len(container) > MAX_KEYS:
            raise _bad("ack_not_understood", "key_id_container must be a non-empty array")
        items = [_obj(item, "key_id_container[]", "ack_not_understood") for item in container]
        if any(not isinstance(item.get("extension", {}), dict) for item in items):
            raise _bad("ack_not_understood", "key_id_container[].extension must be an object")
        ids = tuple(_uuid(item.get("key_id"), "key_id", "ack_not_understood") for item in items)
        status = obj.get("ack_status")
        if status not in ACK_STATUSES:
            raise _bad("ack_not_understood",
                       "ack_status must be one of: " + ", ".join(ACK_STATUSES))
        initiator = obj.get("initiator_sae_id")
        targets = obj.get("target_sae_ids", [obj["target_sae_id"]] if "target_sae_id" in obj
                          else None)
        try:
            initiator = _sae(initiator, "initiator_sae_id")
            targets = _saes(targets, "target_sae_ids")
        except KmstnError as exc:
            raise _bad("ack_not_understood", exc.public) from None
        message = obj.get("message")
        if message is not None and (not isinstance(message, str) or len(message) > MAX_MESSAGE):
            raise _bad("ack_not_understood", "message must be a string of at most 4096 characters")
        ext = obj.get("extension")
        if ext is not None and not isinstance(ext, dict):
            raise _bad("ack_not_understood", "extension must be an object")
        acks.append(AckContainer(ids, status, initiator, targets, message, ext or None))
    return acks


def acks_json(acks: Sequence[AckContainer]) -> bytes:
    """ack_containers (5.2); a container of more than 1024 keys goes out as several."""
    out = []
    parts = ((c, i) for c in acks for i in range(0, max(len(c.key_ids), 1), MAX_KEYS))
    for a, start in parts:
        item: dict[str, Any] = {
            "key_id_container": [{"key_id": str(k)} for k in a.key_ids[start:start + MAX_KEYS]],
            "ack_status": a.ack_status,
            "initiator_sae_id": a.initiator_sae_id,
            "target_sae_ids": list(a.target_sae_ids),
        }
        if a.message:
            item["message"] = a.message[:MAX_MESSAGE]
        if a.extension:
            item["extension"] = a.extension
        out.append(item)
    return json.dumps(out, separators=(",", ":")).encode()


def parse_void(body: bytes) -> VoidContainer:
    """Parse a void_container (5.3); ``[]`` needs all_confirmation (rule 6.8)."""
    obj = _obj(_load(body, "key_voiding_error"), "void_container", "key_voiding_error")
    raw_ids = obj.get("key_ids")
    if not isinstance(raw_ids, list):
        raise _bad("key_voiding_error", "key_ids must be an array of UUID strings")
    ids = tuple(_uuid(v, "key_ids[]", "key_voiding_error") for v in raw_ids)
    confirm = obj.get("all_confirmation", False)
    if not isinstance(confirm, bool):
        raise _bad("key_voiding_error", "all_confirmation must be a boolean")
    if not ids and not confirm:
        raise _bad("no_all_confirmation",
                   "an empty key_ids voids every key of this SAE set and needs "
                   "all_confirmation: true")
    try:
        initiator = _sae(_require(obj, "initiator_sae_id"), "initiator_sae_id")
        targets = _saes(_require(obj, "target_sae_ids"), "target_sae_ids")
        callback = _callback(obj)
    except KmstnError as exc:
        raise _bad("key_voiding_error", exc.public) from None
    ext = obj.get("extension")
    if ext is not None and not isinstance(ext, dict):
        raise _bad("key_voiding_error", "extension must be an object")
    return VoidContainer(ids, initiator, targets, callback, confirm, ext or None)


def void_json(v: VoidContainer) -> bytes:
    out: dict[str, Any] = {
        "key_ids": [str(k) for k in v.key_ids],
        "initiator_sae_id": v.initiator_sae_id,
        "target_sae_ids": list(v.target_sae_ids),
    }
    if v.ack_callback_url:
        out["ack_callback_url"] = v.ack_callback_url
    if v.all_confirmation:
        out["all_confirmation"] = True
    if v.extension:
        out["extension"] = v.extension
    return json.dumps(out, separators=(",", ":")).encode()
