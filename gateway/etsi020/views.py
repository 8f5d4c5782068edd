"""ETSI GS QKD 020 V1.1.1: versions, ext_keys, ext_keys/ack, ext_keys/void.

Who may call: only nodes named in the topology that are neighbours of this
node (every 020 exchange is hop by hop). A kmstn neighbour must have
negotiated X25519MLKEM768 and must seal every message in the relay's
envelope (media type ``application/vnd.kmstn.sealed+json``); a foreign KMS
(site link) speaks plain ETSI 020 JSON (``application/json``). The media
type tells the two apart; the endpoints are the same.

Modes (clause 3 of the spec note): a request with ``ack_callback_url`` is
answered 202 at once and acknowledged later by a POST to that URL; without
it the answer is 200 with the ack containers (``synchronous_mode``, which
/kmapi/versions advertises). Everything that can refuse a request with
400/401 is checked before anything is kept (rule 6.2).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import ClientDisconnected

from gateway.app import json_response
from gateway.auth import TLS_GROUP_KEY, caller_identity
from kme import etsi020
from kme import log as kmelog
from kme.config import Kmstn, NodeConfig
from kme.errors import ErrorCode, KmstnError
from kme.flows import DeviceKeysNotice, Flows, MessageType
from kme.pqtls import PQ_GROUP
from kme.types import NodeId

blueprint = Blueprint("etsi020", __name__)
log = logging.getLogger("kmstn.gateway.etsi020")


def _flows() -> Flows:
    return cast(Flows, current_app.config["kmstn.flows"])


def _peer() -> tuple[Kmstn, bool]:
    """The calling neighbour and whether its body is sealed; 401 for anyone else."""
    config = cast(NodeConfig, current_app.config["kmstn.config"])
    who = caller_identity(request.environ)
    peer = config.topology.kmstns.get(NodeId(who))
    neighbours = {link.other(config.node_id) for link in config.topology.links_of(config.node_id)}
    if peer is None or peer.id not in neighbours:
        raise KmstnError(ErrorCode.UNAUTHENTICATED,
                         "the client certificate does not name a neighbour KMSTN",
                         cause=f"certificate CN {who!r}")
    if peer.kind == "kmstn" and request.environ.get(TLS_GROUP_KEY) != PQ_GROUP:
        raise KmstnError(ErrorCode.UNAUTHENTICATED,
                         f"kmstn peers must negotiate {PQ_GROUP}",
                         cause=f"negotiated {request.environ.get(TLS_GROUP_KEY)!r}")
    sealed = (request.mimetype == etsi020.SEALED_MEDIA_TYPE)
    return peer, sealed


def _body() -> bytes:
    try:
        return request.get_data(cache=False)
    except (TimeoutError, OSError, ClientDisconnected):
        # ETSI 020 408: the request was not fully received in time. (Werkzeug
        # reports the socket timeout as ClientDisconnected.) The 408 also
        # closes the connection: the rest of the body is not coming.
        raise KmstnError(ErrorCode.TIMEOUT, "request body not received in time",
                         reason="request_timeout") from None


def _message(peer: Kmstn, sealed: bool, kind: MessageType) -> tuple[bytes, int]:
    """The plain 020 body and its hop number, opening the envelope of a kmstn peer."""
    raw = _body()
    if peer.kind == "kmstn":
        if not sealed:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             "messages between kmstn nodes must be sealed "
                             f"({etsi020.SEALED_MEDIA_TYPE})")
        opened = _flows().relay.open(peer.id, kind, raw)
        return opened.body, opened.hop
    if sealed:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         "a foreign KMS speaks plain ETSI 020 JSON to this node")
    return raw, 0


def _check_callback(peer: Kmstn, url: str | None) -> None:
    """Acks go only to the calling neighbour's own 020 listener."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.hostname != peer.host or (parts.port or 443) != peer.etsi020_port:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         "ack_callback_url must point at the calling KMS's own 020 listener",
                         reason="missing_parameters")


def _acks(acks: list[etsi020.AckContainer]) -> Response:
    return json_response(None, 200, raw=etsi020.acks_json(acks))


@blueprint.get("/kmapi/versions")
def versions() -> Response:
    _peer()
    return json_response({"versions": list(etsi020.VERSIONS),
                          "capabilities": list(etsi020.CAPABILITIES)})


@blueprint.post("/kmapi/v1/ext_keys")
def ext_keys() -> Response:
    peer, sealed = _peer()
    flows = _flows()
    body, hop = _message(peer, sealed, "ext_keys")
    container = etsi020.parse_ext_keys(body)
    _check_callback(peer, container.ack_callback_url)
    with kmelog.log_context(peer=peer.id, key_ids=[str(k) for k in container.key_ids]):
        plan = flows.plan_ext_keys(peer.id, container, hop)
        if container.ack_callback_url is None:
            return _acks(flows.ext_keys(peer.id, container, hop, plan))
    return _accepted(flows, peer.id, container.ack_callback_url, container.key_ids,
                     container.initiator_sae_id, container.target_sae_ids, "failed",
                     lambda: flows.ext_keys(peer.id, container, hop, plan))


@blueprint.post("/kmapi/v1/ext_keys/void")
def void() -> Response:
    peer, sealed = _peer()
    flows = _flows()
    body, hop = _message(peer, sealed, "void")
    container = etsi020.parse_void(body)
    _check_callback(peer, container.ack_callback_url)
    if container.ack_callback_url is None:
        return _acks(flows.void(peer.id, container, hop))
    return _accepted(flows, peer.id, container.ack_callback_url, container.key_ids,
                     container.initiator_sae_id, container.target_sae_ids, "failed to void",
                     lambda: flows.void(peer.id, container, hop))


@blueprint.post("/kmapi/v1/ext_keys/ack")
def ack() -> Response:
    peer, sealed = _peer()
    flows = _flows()
    body, _ = _message(peer, sealed, "ack")
    acks = etsi020.parse_acks(body)
    unknown = flows.relay.deliver_ack(peer.id, acks)
    if unknown:
        raise KmstnError(ErrorCode.KEY_NOT_FOUND,
                         "no ext_keys or void was pending for: " + ", ".join(map(str, unknown)),
                         reason="key_not_present")
    return Response(status=200)


@blueprint.post("/kmapi/v1/kmstn/device_keys")
def device_keys() -> Response:
    """kmstn only: a QKD neighbour took keys from our shared device for SAEs served here."""
    peer, sealed = _peer()
    if peer.kind != "kmstn":
        raise KmstnError(ErrorCode.UNAUTHENTICATED, "only kmstn neighbours use this endpoint")
    body, _ = _message(peer, sealed, "device_keys")
    notice = DeviceKeysNotice.from_json(body)
    with kmelog.log_context(peer=peer.id, key_ids=[str(k) for k in notice.key_ids]):
        return _acks(_flows().device_keys(peer.id, notice))


def _accepted(flows: Flows, peer: str, url: str, key_ids: tuple[uuid.UUID, ...],
              initiator: str, targets: tuple[str, ...], failed_status: str,
              work: Callable[[], list[etsi020.AckContainer]]) -> Response:
    """Asynchronous mode (clause 3): answer 202 now, do the work, then POST the acks."""

    def later() -> None:
        try:
            acks = work()
        except KmstnError as exc:
            acks = [etsi020.AckContainer(key_ids, failed_status, initiator, targets,
                                         exc.public)] if key_ids else []
            if not key_ids:  # a void of all keys: an ack cannot name them
                log.error("asynchronous void of all keys failed; no ack can name the keys",
                          extra={"peer": peer, "error": exc.public, "cause": exc.cause})
        if acks:  # nothing voided anywhere: there is nothing to acknowledge
            _send_ack(flows, peer, url, acks)

    flows.in_background(later)
    return Response(status=202)


def _send_ack(flows: Flows, peer: str, url: str, acks: list[etsi020.AckContainer]) -> None:
    """ETSI 020 rule 6.4: a failed ack is retried; after that the keys are voided."""
    for attempt in range(3):
        try:
            status = flows.relay.send_ack(peer, url, acks)
            if status == 200:
                return
            log.warning("ack refused", extra={"peer": peer, "http_status": status})
        except KmstnError as exc:
            log.warning("ack failed", extra={"peer": peer, "attempt": attempt + 1,
                                             "error": exc.public, "cause": exc.cause})
    for a in acks:
        if a.ack_status == "relayed":
            try:
                flows.void(NodeId(""), etsi020.VoidContainer(a.key_ids, a.initiator_sae_id,
                                                             a.target_sae_ids), 0)
            except KmstnError as exc:
                log.error("void after a failed ack did not finish", extra={
                    "peer": peer, "error": exc.public, "key_ids": [str(k) for k in a.key_ids]})
