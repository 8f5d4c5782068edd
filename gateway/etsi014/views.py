"""ETSI GS QKD 014 V1.1.1 clause 5: status, enc_keys, dec_keys (GET and POST).

The caller is always the SAE named in its verified certificate; the path
holds only the peer SAE ID. Parsing and limits live in kme.etsi014 (shared
with the QKD device emulator; the gateway reads requests leniently, as its
docstring says); the request's limits come from kme.flows.limits_for
(configuration and routes, no call). Get key and Get status are then one call
to the relay, which owns delivery; Get key with key IDs is one take from the
keyvault.
"""

from __future__ import annotations

from typing import cast

from flask import Blueprint, Response, current_app, request

import kme.etsi014 as etsi014
from gateway.app import json_response
from gateway.auth import caller_identity
from gateway.deps import Edge
from kme import flows, metrics
from kme import log as kmelog
from kme.errors import ErrorCode, KmstnError
from kme.flows import limits_for, own_sae
from kme.types import Deadline, sae_id

blueprint = Blueprint("etsi014", __name__)

# kmstn's Key request extension (issue 11): how long, in ms, the master will
# wait for key when too little is at hand; the node's [supply] wait_ms caps it.
WAIT_EXTENSION = "kmstn_wait_ms"


def _wait_ms(req: etsi014.KeyRequest) -> int:
    """The master's wait budget from ``kmstn_wait_ms`` (0: the node's own)."""
    for entry in (*req.extension_mandatory, *req.extension_optional):
        if WAIT_EXTENSION in entry:
            value = entry[WAIT_EXTENSION]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                                 f"{WAIT_EXTENSION} must be a non-negative integer (ms)")
            # 0 means "do not wait": 1 ms is the least the relay distinguishes from its own.
            return max(1, min(value, 2**31))
    return 0


def _edge() -> Edge:
    return cast(Edge, current_app.config["kmstn.edge"])


def _caller(edge: Edge) -> str:
    sae = caller_identity(request.environ)
    own_sae(edge.config, sae, edge.routes)
    return sae


@blueprint.get("/api/v1/keys/<path:slave>/status")
def status(slave: str) -> Response:
    """Get status (clause 5.1): the path names the slave SAE."""
    edge = _edge()
    master = _caller(edge)
    with kmelog.log_context(sae_id=master):
        return json_response(etsi014.status_body(edge.relay.get_status(master, sae_id(slave))))


@blueprint.route("/api/v1/keys/<path:slave>/enc_keys", methods=["GET", "POST"])
def enc_keys(slave: str) -> Response:
    """Get key (clause 5.2): GET with number/size only, or POST a Key request."""
    edge = _edge()
    master = _caller(edge)
    slave = sae_id(slave)
    with kmelog.log_context(sae_id=master):
        assert edge.routes is not None  # noqa: S101 - the 014 edge is built with routes
        limits, _ = limits_for(edge.config, edge.routes, slave)
        req = etsi014.read_key_request(request.method, request.args.to_dict(flat=False),
                                       request.get_data(), limits,
                                       supported_extensions=(WAIT_EXTENSION,))
        etsi014.check_slaves(master, slave, req, limits)
        deadline = Deadline.after(edge.config.gateway.relay_timeout_ms / 1000)
        keys = edge.relay.get_keys(master, (slave, *req.additional_slave_sae_ids), req.number,
                                   req.size, deadline, wait_ms=_wait_ms(req))
        return json_response(etsi014.key_container(keys))


@blueprint.route("/api/v1/keys/<path:master>/dec_keys", methods=["GET", "POST"])
def dec_keys(master: str) -> Response:
    """Get key with key IDs (clause 5.3): the caller is the slave, the path names the master."""
    edge = _edge()
    slave = _caller(edge)
    master = sae_id(master)
    with kmelog.log_context(sae_id=slave):
        key_ids = etsi014.read_key_ids(request.method, request.args.to_dict(flat=False),
                                       request.get_data())
        assert edge.vault is not None  # noqa: S101 - the 014 edge is built with the keyvault
        keys = flows.dec_keys(edge.config, edge.vault.take, slave, master, key_ids,
                              edge.routes)
        metrics.count_key_bits("delivered", sum(k.size_bits for k in keys), "slave")
        return json_response(etsi014.key_container(keys))
