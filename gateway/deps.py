"""Build the flows of one gateway process from the node's real services.

Adapters turn each service's typed client into the small port kme.flows
expects. Everything is built inside the serving process (after Gunicorn's
fork), because gRPC channels do not survive a fork.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import cast

from keyvault.client import KeyVaultClient, StoreItem
from kme.acks import ack_to_proto, acks_from_proto
from kme.channels import call, internal_channel
from kme.config import NodeConfig
from kme.etsi020 import AckContainer
from kme.flows import DevicesPort, Flows, ForwardResult, MessageType, OpenedMessage, StoreRequest
from kme.qkd import QkdDevices
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.types import Key
from relay.client import RelayClient
from relay.convert import type_to_proto
from routing.follower import TableFollower

__all__ = ["RelayAdapter", "VaultAdapter", "build_flows"]


class VaultAdapter:
    def __init__(self, client: KeyVaultClient) -> None:
        self._client = client

    def store(self, items: Sequence[StoreRequest]) -> int:
        return self._client.store([StoreItem(i.key, i.master_sae_id, i.allowed_sae_ids,
                                             i.origin_node_id) for i in items])

    def take(self, sae_id: str, master_sae_id: str, key_ids: Sequence[uuid.UUID],
             wait_ms: int = 0) -> list[Key]:
        return self._client.take(sae_id, master_sae_id, key_ids, wait_ms)

    def void(self, key_ids: Sequence[uuid.UUID], initiator_sae_id: str,
             target_sae_ids: Sequence[str], all_confirmation: bool = False
             ) -> list[AckContainer]:
        return acks_from_proto(self._client.void(key_ids, initiator_sae_id, target_sae_ids,
                                                 all_confirmation))


class RelayAdapter:
    def __init__(self, config: NodeConfig) -> None:
        channel = internal_channel(config, "relay")
        self._stub = relay_pb2_grpc.RelayStub(channel)
        self._client = RelayClient(channel, timeout=config.relay.timeout_ms / 1000 + 2)
        self._timeout = config.relay.timeout_ms / 1000

    def forward(self, next_hop: str, message_type: MessageType, body: bytes, hop: int,
                timeout: float) -> ForwardResult:
        req = relay_pb2.ForwardRequest(next_hop_node_id=next_hop,
                                       message_type=type_to_proto(message_type), body=body,
                                       hop=hop, timeout_ms=int(timeout * 1000))
        resp = call(self._stub.Forward, req, timeout + 2)
        return ForwardResult(resp.http_status, resp.body, tuple(acks_from_proto(resp.acks)))

    def open(self, peer: str, message_type: MessageType, envelope: bytes) -> OpenedMessage:
        opened = self._client.open(peer, message_type, envelope)
        return OpenedMessage(opened.body, opened.hop)

    def deliver_ack(self, peer: str, acks: Sequence[AckContainer]) -> list[uuid.UUID]:
        req = relay_pb2.DeliverAckRequest(peer_node_id=peer,
                                          acks=[ack_to_proto(a) for a in acks])
        resp = call(self._stub.DeliverAck, req, self._timeout)
        return [uuid.UUID(k) for k in resp.unknown_key_ids]

    def send_ack(self, peer: str, callback_url: str, acks: Sequence[AckContainer]) -> int:
        req = relay_pb2.SendAckRequest(peer_node_id=peer, callback_url=callback_url,
                                       acks=[ack_to_proto(a) for a in acks])
        return int(call(self._stub.SendAck, req, self._timeout + 2).http_status)


def build_flows(config: NodeConfig) -> Flows:
    wait = config.gateway.inflight_wait_ms / 1000
    return Flows(
        config,
        # Routes are read in-process from the forwarding table that the
        # routing service keeps current over a stream (no RPC per route).
        TableFollower(internal_channel(config, "routing")),
        VaultAdapter(KeyVaultClient(internal_channel(config, "keyvault"), timeout=5.0 + wait)),
        RelayAdapter(config),
        cast(DevicesPort, QkdDevices(config)),
        workers=max(8, config.gateway.threads),
    )
