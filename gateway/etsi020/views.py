"""ETSI GS QKD 020 V1.1.1: versions, ext_keys, ext_keys/ack, ext_keys/void.

Who may call: only nodes named in the topology that are neighbours of this
node (every 020 exchange is hop by hop). A kmstn neighbour must have
negotiated X25519MLKEM768 and must seal every message in the relay's
envelope (media type ``application/vnd.kmstn.sealed+json``); a foreign KMS
(site link) speaks plain ETSI 020 JSON (``application/json``). The media
type tells the two apart; the endpoints are the same.

This listener is an edge: it checks who calls and what shape the request
has, then makes one call to the relay. A sealed body goes to the relay
unopened (nothing this process imports can open it); a plain body is parsed
and validated here and handed over as a typed message. The relay's typed
answer is rendered as ack containers (200), 202, or an empty 200; its errors
as problem details (gateway/errors.py).

Modes (clause 3 of the spec note): a request with ``ack_callback_url`` is
answered 202 at once and acknowledged later by a POST to that URL; without
it the answer is 200 with the ack containers (``synchronous_mode``, which
/kmapi/versions advertises).
"""

from __future__ import annotations

from typing import cast
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import ClientDisconnected

from gateway.app import json_response
from gateway.auth import TLS_GROUP_KEY, caller_identity
from gateway.deps import Edge
from kme import etsi020
from kme.config import Kmstn
from kme.errors import ErrorCode, KmstnError
from kme.etsi020 import AckContainer, ExtKeyContainer, VoidContainer
from kme.pqtls import PQ_GROUP
from kme.types import Deadline, NodeId
from relay.client import Answer

blueprint = Blueprint("etsi020", __name__)

# The sender's absolute deadline (Unix ms), for our one call to the relay.
DEADLINE_HEADER = "Kmstn-Deadline"


def _edge() -> Edge:
    return cast(Edge, current_app.config["kmstn.edge"])


def _peer(edge: Edge) -> Kmstn:
    """The calling neighbour; 401 for anyone else."""
    config = edge.config
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
    return peer


def _body() -> bytes:
    try:
        return request.get_data(cache=False)
    except (TimeoutError, OSError, ClientDisconnected):
        # ETSI 020 408: the request was not fully received in time. (Werkzeug
        # reports the socket timeout as ClientDisconnected.) The 408 also
        # closes the connection: the rest of the body is not coming.
        raise KmstnError(ErrorCode.TIMEOUT, "request body not received in time",
                         reason="request_timeout") from None


def _deadline() -> Deadline | None:
    value = request.headers.get(DEADLINE_HEADER, "")
    return Deadline(int(value)) if value.isdigit() and len(value) <= 15 else None


def _sealed_or_plain(peer: Kmstn) -> bytes | None:
    """The envelope of a kmstn peer (None for a foreign KMS's plain body, read later)."""
    sealed = request.mimetype == etsi020.SEALED_MEDIA_TYPE
    if peer.kind == "kmstn":
        if not sealed:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             "messages between kmstn nodes must be sealed "
                             f"({etsi020.SEALED_MEDIA_TYPE})")
        return _body()
    if sealed:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         "a foreign KMS speaks plain ETSI 020 JSON to this node")
    return None


def _check_callback(peer: Kmstn, url: str | None) -> None:
    """Acks go only to the calling neighbour's own 020 listener."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.hostname != peer.host or (parts.port or 443) != peer.etsi020_port:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         "ack_callback_url must point at the calling KMS's own 020 listener",
                         reason="missing_parameters")


def _render(answer: Answer) -> Response:
    if answer.kind == "acks":
        return json_response(None, 200, raw=etsi020.acks_json(answer.acks))
    return Response(status=202 if answer.kind == "accepted" else 200)


def _receive(message_type: str,
             parse: type[ExtKeyContainer] | type[VoidContainer] | type[AckContainer] | None
             ) -> Response:
    edge = _edge()
    peer = _peer(edge)
    if parse is None and peer.kind != "kmstn":
        raise KmstnError(ErrorCode.UNAUTHENTICATED, "only kmstn neighbours use this endpoint")
    envelope = _sealed_or_plain(peer)
    message: bytes | ExtKeyContainer | VoidContainer | list[AckContainer]
    if envelope is not None:
        message = envelope
    elif parse is ExtKeyContainer:
        message = etsi020.parse_ext_keys(_body())
        _check_callback(peer, message.ack_callback_url)
    elif parse is VoidContainer:
        message = etsi020.parse_void(_body())
        _check_callback(peer, message.ack_callback_url)
    else:
        message = etsi020.parse_acks(_body())
    return _render(edge.relay.receive(peer.id, message_type, message, _deadline()))


@blueprint.get("/kmapi/versions")
def versions() -> Response:
    _peer(_edge())
    return json_response({"versions": list(etsi020.VERSIONS),
                          "capabilities": list(etsi020.CAPABILITIES)})


@blueprint.post("/kmapi/v1/ext_keys")
def ext_keys() -> Response:
    return _receive("ext_keys", ExtKeyContainer)


@blueprint.post("/kmapi/v1/ext_keys/void")
def void() -> Response:
    return _receive("void", VoidContainer)


@blueprint.post("/kmapi/v1/ext_keys/ack")
def ack() -> Response:
    return _receive("ack", AckContainer)


@blueprint.post("/kmapi/v1/kmstn/device_keys")
def device_keys() -> Response:
    """kmstn only: a QKD neighbour took keys from our shared device for SAEs served here."""
    return _receive("device_keys", None)
