"""The neighbour-facing side of the relay: the ML-KEM-768 exchange between adjacent relays,
and link state (hellos, flooding, sync) between neighbours.

``RelayPeerService`` (kme.rpc.v1.RelayPeer) is the receiver's side, on TCP
``host:relay_port`` with mutual TLS using node certificates; the caller is the
subject CN of its verified client certificate and must be a kmstn neighbour.
``RelayPeerClient`` is the sender's side; build its channel with
:func:`peer_channel`. The link-state calls are handed to the relay's
:class:`relay.linkstate.LinkStateAgent` with the caller's node ID, which is
what the routing service logs when a record it sent fails verification.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from kme.channels import call, mtls_channel
from kme.config import NodeConfig
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.types import NodeId
from relay import kem
from relay.hopkey import DeviceDirectory, HopLinks
from relay.kem import OneTimeKey
from relay.qkdreserve import ReservedQkdKeys

if TYPE_CHECKING:
    from relay.linkstate import LinkStateAgent

__all__ = ["RelayPeerClient", "RelayPeerService", "caller_node", "peer_channel"]


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


def caller_node(context: grpc.ServicerContext, links: HopLinks) -> NodeId:
    """The neighbour calling us: the CN of its verified TLS client certificate."""
    auth = context.auth_context()
    names: object = auth.get("x509_common_name")
    values = list(names) if isinstance(names, (list, tuple)) else []
    if len(values) != 1 or not isinstance(values[0], bytes):
        raise KmstnError(ErrorCode.UNAUTHENTICATED, "a verified client certificate is required")
    name = values[0].decode("utf-8", "replace")
    try:
        return links.require_neighbour(name)
    except KmstnError:
        raise KmstnError(ErrorCode.PERMISSION_DENIED,
                         "the caller is not a kmstn neighbour of this node",
                         cause=f"client certificate CN {name!r}") from None


class RelayPeerService(relay_pb2_grpc.RelayPeerServicer):
    """kme.rpc.v1.RelayPeer: the receiver's side of the ML-KEM-768 exchange."""

    def __init__(self, links: HopLinks, sessions: kem.SessionStore,
                 log: logging.Logger | None = None, reserved: ReservedQkdKeys | None = None,
                 devices: DeviceDirectory | None = None,
                 linkstate: LinkStateAgent | None = None) -> None:
        self._links = links
        self._sessions = sessions
        self._log = log or logging.getLogger("kmstn.relay")
        self._reserved = reserved
        self._devices = devices
        self._linkstate = linkstate

    def attach_linkstate(self, agent: LinkStateAgent) -> None:
        self._linkstate = agent

    def _agent(self) -> LinkStateAgent:
        if self._linkstate is None:
            raise KmstnError(ErrorCode.UNAVAILABLE, "this node runs no link state")
        return self._linkstate

    # -- link state --------------------------------------------------------------------

    def Hello(  # noqa: N802
        self, request: relay_pb2.HelloRequest, context: grpc.ServicerContext
    ) -> relay_pb2.HelloResponse:
        peer = caller_node(context, self._links)
        return relay_pb2.HelloResponse(digest=self._agent().on_hello(peer, request.digest))

    def Flood(  # noqa: N802
        self, request: relay_pb2.FloodRequest, context: grpc.ServicerContext
    ) -> relay_pb2.FloodResponse:
        peer = caller_node(context, self._links)
        self._agent().on_flood(peer, list(request.records))
        return relay_pb2.FloodResponse()

    def SyncLinkState(  # noqa: N802
        self, request: relay_pb2.SyncLinkStateRequest, context: grpc.ServicerContext
    ) -> relay_pb2.SyncLinkStateResponse:
        peer = caller_node(context, self._links)
        return self._agent().on_sync(peer, list(request.headers))

    # -- the KEM exchange and QKD reservations -------------------------------------------

    def ReserveQkdKeys(  # noqa: N802
        self, request: relay_pb2.ReserveQkdKeysRequest, context: grpc.ServicerContext
    ) -> relay_pb2.ReserveQkdKeysResponse:
        peer = caller_node(context, self._links)
        device = self._devices.toward(peer) if self._devices is not None else None
        if self._reserved is None or device is None or self._links.qkd_link(peer) is None:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             f"no QKD link with {peer} to reserve keys on")
        try:
            ids = [uuid.UUID(k) for k in request.key_ids]
        except ValueError:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "key_ids must be UUIDs") from None
        held = self._reserved.hold(peer, device, ids)
        self._log.debug("holding announced QKD keys", extra={"peer": peer, "count": held})
        return relay_pb2.ReserveQkdKeysResponse(ttl_seconds=self._reserved.ttl_seconds)

    def PublicKeys(  # noqa: N802
        self, request: relay_pb2.PublicKeysRequest, context: grpc.ServicerContext
    ) -> relay_pb2.PublicKeysResponse:
        peer = caller_node(context, self._links)
        keys = self._sessions.issue(peer, request.count)
        self._log.debug("issued one-time keys", extra={"peer": peer, "count": len(keys)})
        return relay_pb2.PublicKeysResponse(keys=[
            relay_pb2.OneTimePublicKey(session_id=str(k.session), public_key=k.public_key,
                                       ttl_seconds=k.ttl_seconds)
            for k in keys])

    def Encapsulated(  # noqa: N802
        self, request: relay_pb2.EncapsulatedRequest, context: grpc.ServicerContext
    ) -> relay_pb2.EncapsulatedResponse:
        peer = caller_node(context, self._links)
        try:
            session = uuid.UUID(request.session_id)
        except ValueError:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "session_id must be a UUID") from None
        self._sessions.exchange(peer, session, request.ciphertext)
        return relay_pb2.EncapsulatedResponse()
