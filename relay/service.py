"""kme.rpc.v1.Relay: the node's gateways hand the relay each request in one call.

``GetKeys`` / ``GetStatus`` come from the 014 gateway (the master side);
``Receive`` from the 020 gateway, with a neighbour's sealed envelope (opened
here, never in the gateway) or a foreign KMS's parsed plain message. The
flows (kme.flows) decide and act; this module only converts between proto
and domain values and picks the deadline. ``Seal`` / ``Open`` serve tests and
benchmarks.
"""

from __future__ import annotations

import logging
import time

import grpc

from kme import etsi020, metrics
from kme import log as kmelog
from kme.acks import ack_to_proto, acks_from_proto
from kme.errors import ErrorCode, KmstnError
from kme.etsi020 import AckContainer, ExtKeyContainer, VoidContainer
from kme.flows import DeviceKeysNotice, Flows
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.types import Deadline, NodeId
from relay.convert import (
    Opened,
    ext_keys_from_proto,
    keys_to_proto,
    kind_to_proto,
    status_to_proto,
    type_from_proto,
    void_from_proto,
)
from relay.hop import Opener, Sealer

__all__ = ["RelayService"]

Incoming = ExtKeyContainer | VoidContainer | DeviceKeysNotice | list[AckContainer]


def _parse(message_type: str, body: bytes) -> Incoming:
    if message_type == "ext_keys":
        return etsi020.parse_ext_keys(body)
    if message_type == "void":
        return etsi020.parse_void(body)
    if message_type == "device_keys":
        return DeviceKeysNotice.from_json(body)
    return etsi020.parse_acks(body)


class RelayService(relay_pb2_grpc.RelayServicer):
    def __init__(self, flows: Flows, sealer: Sealer, opener: Opener, kmstn_peers: set[str],
                 budget_s: float, log: logging.Logger | None = None) -> None:
        self._flows = flows
        self._sealer = sealer
        self._opener = opener
        self._kmstn_peers = kmstn_peers
        self._budget = budget_s
        self._log = log or logging.getLogger("kmstn.relay")

    def _deadline(self, context: grpc.ServicerContext, announced: Deadline | None = None
                  ) -> Deadline:
        """The request's deadline: the announced one, never beyond our own budget."""
        ours = Deadline.after(self._budget)
        rpc = Deadline.from_rpc(context.time_remaining(), self._budget)
        return (announced or ours).earliest(ours).earliest(rpc)

    # -- ETSI 014, from the 014 gateway ------------------------------------------------

    def GetKeys(  # noqa: N802 - gRPC method name
        self, request: relay_pb2.GetKeysRequest, context: grpc.ServicerContext
    ) -> relay_pb2.GetKeysResponse:
        if not request.slave_sae_ids:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "at least one slave SAE is required")
        with kmelog.log_context(sae_id=request.master_sae_id):
            keys = self._flows.northbound.enc_keys(
                request.master_sae_id, list(request.slave_sae_ids), request.number or 1,
                request.size_bits, self._deadline(context), caller_alive=context.is_active,
                wait_ms=request.wait_ms)
        metrics.count_key_bits("delivered", sum(k.size_bits for k in keys), "master")
        return relay_pb2.GetKeysResponse(keys=keys_to_proto(keys))

    def GetStatus(  # noqa: N802
        self, request: relay_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> relay_pb2.GetStatusResponse:
        return status_to_proto(self._flows.northbound.status(request.master_sae_id,
                                                             request.slave_sae_id))

    # -- ETSI 020, from the 020 gateway ------------------------------------------------

    def Receive(  # noqa: N802
        self, request: relay_pb2.ReceiveRequest, context: grpc.ServicerContext
    ) -> relay_pb2.ReceiveResponse:
        peer = NodeId(request.peer_node_id)
        message_type = type_from_proto(request.message_type)
        which = request.WhichOneof("message")
        sealed = which == "envelope"
        if sealed != (peer in self._kmstn_peers):
            # The listener enforces this per peer already; the relay does not
            # act on a message whose form does not fit its sender either.
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             "messages between kmstn nodes must be sealed; a foreign KMS "
                             "speaks plain ETSI 020")
        started = time.monotonic()
        kind: metrics.LinkKind = "site"
        try:
            if sealed:
                opened = self._opener.open(peer, message_type, request.envelope)
                kind = opened.kind
            answer = self._receive(request, peer, message_type, which,
                                   opened if sealed else None, context)
        except KmstnError as exc:
            metrics.observe_hop(kind, "received", message_type, exc.code.name,
                                time.monotonic() - started)
            raise
        metrics.observe_hop(kind, "received", message_type, "ok", time.monotonic() - started)
        return answer

    def _receive(self, request: relay_pb2.ReceiveRequest, peer: NodeId, message_type: str,
                 which: str | None, opened: Opened | None, context: grpc.ServicerContext
                 ) -> relay_pb2.ReceiveResponse:
        message: Incoming
        if opened is not None:
            hop, deadline = opened.hop, self._deadline(context, opened.deadline)
            message = _parse(message_type, opened.body)
        else:
            announced = (Deadline(request.deadline_unix_ms) if request.deadline_unix_ms
                         else None)
            hop, deadline = 0, self._deadline(context, announced)
            if which == "ext_keys" and message_type == "ext_keys":
                message = ext_keys_from_proto(request.ext_keys)
            elif which == "void" and message_type == "void":
                message = void_from_proto(request.void)
            elif which == "acks" and message_type == "ack":
                message = acks_from_proto(request.acks.acks)
            else:
                raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                                 f"a {which or 'missing'} message does not fit {message_type}")
        return self._act(peer, message, hop, deadline)

    def _act(self, peer: NodeId, message: Incoming, hop: int, deadline: Deadline
             ) -> relay_pb2.ReceiveResponse:
        receiver = self._flows.receiver
        if isinstance(message, list):
            receiver.acks(peer, message)
            return relay_pb2.ReceiveResponse(done=relay_pb2.Done())
        key_ids = [str(k) for k in message.key_ids]
        with kmelog.log_context(peer=peer, key_ids=key_ids):
            if isinstance(message, DeviceKeysNotice):
                acks = receiver.device_keys(peer, message, deadline)
            elif message.ack_callback_url is not None:
                receiver.accept(peer, message, hop, deadline)
                return relay_pb2.ReceiveResponse(accepted=relay_pb2.Accepted())
            elif isinstance(message, ExtKeyContainer):
                acks = receiver.ext_keys(peer, message, hop, deadline)
            else:
                acks = receiver.void(peer, message, hop, deadline)
        return relay_pb2.ReceiveResponse(
            acks=relay_pb2.AckList(acks=[ack_to_proto(a) for a in acks]))

    # -- tests and benchmarks -----------------------------------------------------------

    def Seal(  # noqa: N802
        self, request: relay_pb2.SealRequest, context: grpc.ServicerContext
    ) -> relay_pb2.SealResponse:
        sealed = self._sealer.seal_detailed(request.next_hop_node_id,
                                            type_from_proto(request.message_type),
                                            request.body, request.hop)
        return relay_pb2.SealResponse(envelope=sealed.envelope, kind=kind_to_proto(sealed.kind))

    def Open(  # noqa: N802
        self, request: relay_pb2.OpenRequest, context: grpc.ServicerContext
    ) -> relay_pb2.OpenResponse:
        result = self._opener.open(request.peer_node_id, type_from_proto(request.message_type),
                                   request.envelope)
        return relay_pb2.OpenResponse(body=result.body, hop=result.hop,
                                      kind=kind_to_proto(result.kind))
