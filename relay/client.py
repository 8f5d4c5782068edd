"""Typed clients: the node-internal Relay service, and a neighbour's RelayPeer service.

``RelayClient`` is what the gateway and the ``kme`` flows use on the node's
own relay socket. ``RelayPeerClient`` is what one relay uses toward a
neighbour's relay port (TCP, mutual TLS with node certificates); build its
channel with :func:`peer_channel`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kme.channels import call, mtls_channel
from kme.config import NodeConfig
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.types import NodeId
from relay.convert import HopKind, kind_from_proto, type_to_proto
from relay.kem import OneTimeKey

__all__ = ["Opened", "RelayClient", "RelayPeerClient", "SealedMessage", "peer_channel"]


@dataclass(frozen=True, slots=True)
class SealedMessage:
    envelope: bytes
    kind: HopKind


@dataclass(frozen=True, slots=True)
class Opened:
    body: bytes
    hop: int
    kind: HopKind


class RelayClient:
    """The node's own relay (Relay service) over its internal channel."""

    def __init__(self, channel: grpc.Channel, timeout: float = 10.0) -> None:
        self._stub = relay_pb2_grpc.RelayStub(channel)
        self._timeout = timeout

    def seal(self, next_hop: str, message_type: str, body: bytes, hop: int) -> SealedMessage:
        """Seal an ETSI 020 message (``ext_keys``, ``void``, ``ack``, ``device_keys``)."""
        req = relay_pb2.SealRequest(next_hop_node_id=next_hop,
                                    message_type=type_to_proto(message_type), body=body, hop=hop)
        resp = call(self._stub.Seal, req, self._timeout)
        return SealedMessage(resp.envelope, kind_from_proto(resp.kind))

    def open(self, peer: str, message_type: str, envelope: bytes) -> Opened:
        """Open an envelope from ``peer`` (its TLS-verified node ID) that arrived at the
        endpoint for ``message_type``; raises KmstnError (TAMPERED, UNKNOWN_SESSION, ...)."""
        req = relay_pb2.OpenRequest(peer_node_id=peer, message_type=type_to_proto(message_type),
                                    envelope=envelope)
        resp = call(self._stub.Open, req, self._timeout)
        return Opened(resp.body, resp.hop, kind_from_proto(resp.kind))


def peer_channel(config: NodeConfig, peer: NodeId) -> grpc.Channel:
    """An mTLS channel to ``peer``'s relay port, with this node's certificate.

    The server is authenticated by the federation CA and the host in its
    certificate's subjectAltName; gRPC's Python client does not expose the
    server certificate, so its CN is not compared with ``peer`` here.
    """
    node = config.topology.kmstns.get(peer)
    if node is None or node.kind != "kmstn" or not node.relay_port:
        raise KmstnError(ErrorCode.UNKNOWN_NODE, f"{peer!r} runs no kmstn relay")
    host = f"[{node.host}]" if ":" in node.host else node.host
    return mtls_channel(f"{host}:{node.relay_port}", config.tls)


class RelayPeerClient:
    """A neighbour's RelayPeer service: the ML-KEM-768 exchange."""

    def __init__(self, channel: grpc.Channel, timeout: float = 10.0) -> None:
        self._stub = relay_pb2_grpc.RelayPeerStub(channel)
        self._timeout = timeout

    def public_keys(self, count: int) -> list[OneTimeKey]:
        resp = call(self._stub.PublicKeys, relay_pb2.PublicKeysRequest(count=count),
                    self._timeout, wait_for_ready=False)
        out = []
        for k in resp.keys:
            try:
                session = uuid.UUID(k.session_id)
            except ValueError:
                raise KmstnError(ErrorCode.UNAVAILABLE,
                                 "neighbour relay sent a malformed session ID") from None
            out.append(OneTimeKey(session, k.public_key, k.ttl_seconds))
        return out

    def reserve_qkd_keys(self, key_ids: Sequence[uuid.UUID]) -> int:
        """Announce QKD keys taken from the shared device; returns how long they are held."""
        req = relay_pb2.ReserveQkdKeysRequest(key_ids=[str(k) for k in key_ids])
        return int(call(self._stub.ReserveQkdKeys, req, self._timeout,
                        wait_for_ready=False).ttl_seconds)

    def encapsulated(self, session: uuid.UUID, ciphertext: bytes) -> None:
        call(self._stub.Encapsulated,
             relay_pb2.EncapsulatedRequest(session_id=str(session), ciphertext=ciphertext),
             self._timeout, wait_for_ready=False)
