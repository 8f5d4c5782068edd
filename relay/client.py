"""The typed client of the node's own relay (kme.rpc.v1.Relay), for the gateways.

This module and what it imports hold no cryptography: a gateway can pass
an envelope to the relay, but nothing it imports can open one (an import
test checks that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import grpc

from kme.acks import ack_to_proto, acks_from_proto
from kme.channels import call
from kme.etsi014 import Status
from kme.etsi020 import AckContainer, ExtKeyContainer, VoidContainer
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.types import Deadline, Key
from relay.convert import (
    Opened,
    Sealed,
    ext_keys_to_proto,
    keys_from_proto,
    kind_from_proto,
    status_from_proto,
    type_to_proto,
    void_to_proto,
)

__all__ = ["Answer", "RelayClient"]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the 020 listener renders: 200 with acks, 202, or 200 with no body."""

    kind: Literal["acks", "accepted", "done"]
    acks: tuple[AckContainer, ...] = ()


# Added to a call's deadline for the call's own way back.
_SLACK_S = 1.0


class RelayClient:
    """The node's own relay (Relay service) over its internal channel."""

    def __init__(self, channel: grpc.Channel, timeout: float = 10.0) -> None:
        self._stub = relay_pb2_grpc.RelayStub(channel)
        self._timeout = timeout

    def get_keys(self, master: str, slaves: Sequence[str], number: int, size: int,
                 deadline: Deadline, wait_ms: int = 0) -> list[Key]:
        """ETSI 014 Get key for ``master`` toward ``slaves`` (the path slave first);
        ``wait_ms``: the master's own wait budget (0: the node's)."""
        req = relay_pb2.GetKeysRequest(master_sae_id=master, slave_sae_ids=list(slaves),
                                       number=number, size_bits=size, wait_ms=wait_ms)
        resp = call(self._stub.GetKeys, req, max(deadline.remaining(), 0.01))
        return keys_from_proto(resp.keys)

    def get_status(self, master: str, slave: str) -> Status:
        req = relay_pb2.GetStatusRequest(master_sae_id=master, slave_sae_id=slave)
        return status_from_proto(call(self._stub.GetStatus, req, self._timeout))

    def receive(self, peer: str, message_type: str,
                message: bytes | ExtKeyContainer | VoidContainer | Sequence[AckContainer],
                deadline: Deadline | None = None) -> Answer:
        """Hand one incoming ETSI 020 request to the relay: an envelope (kmstn peer) or a
        parsed plain message (foreign KMS)."""
        req = relay_pb2.ReceiveRequest(peer_node_id=peer,
                                       message_type=type_to_proto(message_type),
                                       deadline_unix_ms=deadline.unix_ms if deadline else 0)
        if isinstance(message, bytes):
            req.envelope = message
        elif isinstance(message, ExtKeyContainer):
            req.ext_keys.CopyFrom(ext_keys_to_proto(message))
        elif isinstance(message, VoidContainer):
            req.void.CopyFrom(void_to_proto(message))
        else:
            req.acks.CopyFrom(relay_pb2.AckList(acks=[ack_to_proto(a) for a in message]))
        timeout = (deadline.remaining() if deadline else self._timeout) + _SLACK_S
        resp = call(self._stub.Receive, req, max(timeout, _SLACK_S))
        which = resp.WhichOneof("answer")
        if which == "acks":
            return Answer("acks", tuple(acks_from_proto(resp.acks.acks)))
        return Answer("accepted" if which == "accepted" else "done")

    def seal(self, next_hop: str, message_type: str, body: bytes, hop: int) -> Sealed:
        """Seal an ETSI 020 message (``ext_keys``, ``void``, ``ack``, ``device_keys``)."""
        req = relay_pb2.SealRequest(next_hop_node_id=next_hop,
                                    message_type=type_to_proto(message_type), body=body, hop=hop)
        resp = call(self._stub.Seal, req, self._timeout)
        return Sealed(resp.envelope, kind_from_proto(resp.kind))

    def open(self, peer: str, message_type: str, envelope: bytes) -> Opened:
        """Open an envelope from ``peer`` without acting on it (tests, benchmarks)."""
        req = relay_pb2.OpenRequest(peer_node_id=peer, message_type=type_to_proto(message_type),
                                    envelope=envelope)
        resp = call(self._stub.Open, req, self._timeout)
        return Opened(resp.body, resp.hop, kind_from_proto(resp.kind))
