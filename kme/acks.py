"""The shared messages of kme.rpc.v1.common between their domain form and proto:
ETSI 020 ack containers (kme.etsi020) and link kinds (the one table of them)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from kme.config import LinkKindName
from kme.etsi020 import AckContainer
from kme.rpc.v1 import common_pb2

__all__ = ["STATUS_FROM_PROTO", "STATUS_TO_PROTO", "ack_from_proto", "ack_to_proto",
           "acks_from_proto", "kind_from_proto", "kind_to_proto"]

STATUS_TO_PROTO: dict[str, common_pb2.AckStatus.ValueType] = {
    "relayed": common_pb2.ACK_STATUS_RELAYED,
    "failed": common_pb2.ACK_STATUS_FAILED,
    "voided": common_pb2.ACK_STATUS_VOIDED,
    "failed to void": common_pb2.ACK_STATUS_FAILED_TO_VOID,
    "key not present": common_pb2.ACK_STATUS_KEY_NOT_PRESENT,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}


def ack_to_proto(ack: AckContainer) -> common_pb2.AckContainer:
    return common_pb2.AckContainer(
        key_ids=[str(k) for k in ack.key_ids],
        status=STATUS_TO_PROTO[ack.ack_status],
        initiator_sae_id=ack.initiator_sae_id,
        target_sae_ids=list(ack.target_sae_ids),
        message=ack.message or "",
    )


def ack_from_proto(msg: common_pb2.AckContainer) -> AckContainer:
    return AckContainer(
        key_ids=tuple(uuid.UUID(k) for k in msg.key_ids),
        ack_status=STATUS_FROM_PROTO[msg.status],
        initiator_sae_id=msg.initiator_sae_id,
        target_sae_ids=tuple(msg.target_sae_ids),
        message=msg.message or None,
    )


def acks_from_proto(msgs: Iterable[common_pb2.AckContainer]) -> list[AckContainer]:
    return [ack_from_proto(m) for m in msgs]


LINK_KINDS: dict[LinkKindName, common_pb2.LinkKind.ValueType] = {
    "qkd": common_pb2.LINK_KIND_QKD,
    "pqc": common_pb2.LINK_KIND_PQC,
    "site": common_pb2.LINK_KIND_SITE,
}
_KIND_NAMES = {v: k for k, v in LINK_KINDS.items()}


def kind_to_proto(kind: LinkKindName | None) -> common_pb2.LinkKind.ValueType:
    return LINK_KINDS[kind] if kind else common_pb2.LINK_KIND_UNSPECIFIED


def kind_from_proto(kind: common_pb2.LinkKind.ValueType) -> LinkKindName:
    return _KIND_NAMES[kind]
