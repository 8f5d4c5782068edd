"""Conversions between relay domain values and kme.rpc.v1 messages.

No cryptography here: the gateways import this module (through relay.client).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from kme.acks import LINK_KINDS
from kme.acks import kind_to_proto as link_kind_to_proto
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import Status
from kme.etsi020 import ExtKey, ExtKeyContainer, VoidContainer
from kme.rpc.v1 import common_pb2, relay_pb2
from kme.types import Deadline, Key, SecretBytes, parse_key_id

__all__ = [
    "HopKind",
    "Opened",
    "Sealed",
    "ext_keys_from_proto",
    "ext_keys_to_proto",
    "keys_from_proto",
    "keys_to_proto",
    "kind_from_proto",
    "kind_to_proto",
    "status_from_proto",
    "status_to_proto",
    "type_from_proto",
    "type_to_proto",
    "void_from_proto",
    "void_to_proto",
]

HopKind = Literal["qkd", "pqc"]


@dataclass(frozen=True, slots=True)
class Sealed:
    """An envelope for a neighbour, and how the hop is protected."""

    envelope: bytes
    kind: HopKind
    session: uuid.UUID | None = None  # known where it was sealed


@dataclass(frozen=True, slots=True)
class Opened:
    """The inner ETSI 020 body of an envelope, and what its header said."""

    body: bytes
    hop: int
    kind: HopKind
    session: uuid.UUID | None = None
    message_type: str = ""
    # The deadline the sender bound into the envelope, if any.
    deadline: Deadline | None = None

_TYPES: Final[dict[str, relay_pb2.MessageType.ValueType]] = {
    "ext_keys": relay_pb2.MESSAGE_TYPE_EXT_KEYS,
    "void": relay_pb2.MESSAGE_TYPE_VOID,
    "ack": relay_pb2.MESSAGE_TYPE_ACK,
    "device_keys": relay_pb2.MESSAGE_TYPE_DEVICE_KEYS,
}
_TYPE_NAMES: Final = {v: k for k, v in _TYPES.items()}


def type_to_proto(name: str) -> relay_pb2.MessageType.ValueType:
    try:
        return _TYPES[name]
    except KeyError:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         f"unknown message type {name!r}") from None


def type_from_proto(value: relay_pb2.MessageType.ValueType) -> str:
    try:
        return _TYPE_NAMES[value]
    except KeyError:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         "message_type is required (ext_keys, void, ack or device_keys)") from None


_KIND_NAMES: Final = {v: k for k, v in LINK_KINDS.items()}


def kind_to_proto(kind: HopKind) -> common_pb2.LinkKind.ValueType:
    return link_kind_to_proto(kind)


def kind_from_proto(value: common_pb2.LinkKind.ValueType) -> HopKind:
    """A hop's kind: only QKD and PQC hops are sealed."""
    name = _KIND_NAMES.get(value)
    if name == "qkd":
        return "qkd"
    if name == "pqc":
        return "pqc"
    raise KmstnError(ErrorCode.INTERNAL, "relay answered with an unknown link kind")


# -- the typed messages of Relay.GetKeys / GetStatus / Receive -----------------------------


def _json(obj: dict[str, Any] | None) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() if obj else b""


def _unjson(data: bytes) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT, "extension is not JSON") from None
    if not isinstance(obj, dict):
        raise KmstnError(ErrorCode.INVALID_ARGUMENT, "extension is not a JSON object")
    return obj


def keys_to_proto(keys: Sequence[Key]) -> list[common_pb2.KeyMaterial]:
    return [common_pb2.KeyMaterial(key_id=str(k.key_id), value=k.material.reveal(),
                                   size_bits=k.size_bits) for k in keys]


def keys_from_proto(msgs: Iterable[common_pb2.KeyMaterial]) -> list[Key]:
    return [Key(parse_key_id(m.key_id), SecretBytes(m.value), m.size_bits) for m in msgs]


def ext_keys_to_proto(c: ExtKeyContainer) -> relay_pb2.ExtKeysMessage:
    return relay_pb2.ExtKeysMessage(
        keys=[relay_pb2.ExtKey(key=common_pb2.KeyMaterial(key_id=str(k.key_id),
                                                           value=k.value.reveal(),
                                                           size_bits=len(k.value) * 8),
                               extension_json=_json(k.extension)) for k in c.keys],
        initiator_sae_id=c.initiator_sae_id, target_sae_ids=list(c.target_sae_ids),
        ack_callback_url=c.ack_callback_url or "",
        extension_mandatory_json=_json(c.extension_mandatory),
        extension_optional_json=_json(c.extension_optional))


def ext_keys_from_proto(m: relay_pb2.ExtKeysMessage) -> ExtKeyContainer:
    return ExtKeyContainer(
        keys=tuple(ExtKey(parse_key_id(k.key.key_id), SecretBytes(k.key.value),
                          _unjson(k.extension_json)) for k in m.keys),
        initiator_sae_id=m.initiator_sae_id, target_sae_ids=tuple(m.target_sae_ids),
        ack_callback_url=m.ack_callback_url or None,
        extension_mandatory=_unjson(m.extension_mandatory_json),
        extension_optional=_unjson(m.extension_optional_json))


def void_to_proto(v: VoidContainer) -> relay_pb2.VoidMessage:
    return relay_pb2.VoidMessage(
        key_ids=[str(k) for k in v.key_ids], initiator_sae_id=v.initiator_sae_id,
        target_sae_ids=list(v.target_sae_ids), ack_callback_url=v.ack_callback_url or "",
        all_confirmation=v.all_confirmation, extension_json=_json(v.extension))


def void_from_proto(m: relay_pb2.VoidMessage) -> VoidContainer:
    return VoidContainer(tuple(parse_key_id(k) for k in m.key_ids), m.initiator_sae_id,
                         tuple(m.target_sae_ids), m.ack_callback_url or None,
                         m.all_confirmation, _unjson(m.extension_json))


def status_to_proto(s: Status) -> relay_pb2.GetStatusResponse:
    return relay_pb2.GetStatusResponse(
        source_kme_id=s.source_kme_id, target_kme_id=s.target_kme_id,
        master_sae_id=s.master_sae_id, slave_sae_id=s.slave_sae_id, key_size=s.key_size,
        stored_key_count=s.stored_key_count, max_key_count=s.max_key_count,
        max_key_per_request=s.max_key_per_request, max_key_size=s.max_key_size,
        min_key_size=s.min_key_size, max_sae_id_count=s.max_sae_id_count)


def status_from_proto(m: relay_pb2.GetStatusResponse) -> Status:
    return Status(m.source_kme_id, m.target_kme_id, m.master_sae_id, m.slave_sae_id,
                  m.key_size, m.stored_key_count, m.max_key_count, m.max_key_per_request,
                  m.max_key_size, m.min_key_size, m.max_sae_id_count)
