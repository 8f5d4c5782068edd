"""Conversions between relay domain values and kme.rpc.v1 messages."""

from __future__ import annotations

from typing import Final, Literal

from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import common_pb2, relay_pb2

__all__ = ["HopKind", "kind_from_proto", "kind_to_proto", "type_from_proto", "type_to_proto"]

HopKind = Literal["qkd", "pqc"]

_TYPES: Final[dict[str, relay_pb2.MessageType.ValueType]] = {
    "ext_keys": relay_pb2.MESSAGE_TYPE_EXT_KEYS,
    "void": relay_pb2.MESSAGE_TYPE_VOID,
    "ack": relay_pb2.MESSAGE_TYPE_ACK,
    "device_keys": relay_pb2.MESSAGE_TYPE_DEVICE_KEYS,
}
_TYPE_NAMES: Final = {v: k for k, v in _TYPES.items()}

_KINDS: Final[dict[str, common_pb2.LinkKind.ValueType]] = {
    "qkd": common_pb2.LINK_KIND_QKD,
    "pqc": common_pb2.LINK_KIND_PQC,
}
_KIND_NAMES: Final = {v: k for k, v in _KINDS.items()}


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


def kind_to_proto(kind: HopKind) -> common_pb2.LinkKind.ValueType:
    return _KINDS[kind]


def kind_from_proto(value: common_pb2.LinkKind.ValueType) -> HopKind:
    name = _KIND_NAMES.get(value)
    if name == "qkd":
        return "qkd"
    if name == "pqc":
        return "pqc"
    raise KmstnError(ErrorCode.INTERNAL, "relay answered with an unknown link kind")
