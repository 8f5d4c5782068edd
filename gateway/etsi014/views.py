"""ETSI GS QKD 014 V1.1.1 clause 5: status, enc_keys, dec_keys (GET and POST).

The caller is always the SAE named in its verified certificate; the path
holds only the peer SAE ID. Parsing and limits live in kme.etsi014 (shared
with the QKD device emulator; the gateway reads requests leniently, as its
docstring says), the delivery logic in kme.flows.
"""

from __future__ import annotations

from typing import cast

from flask import Blueprint, Response, current_app, request

import kme.etsi014 as etsi014
from gateway.app import json_response
from gateway.auth import caller_identity
from kme import log as kmelog
from kme.flows import Flows
from kme.types import sae_id

blueprint = Blueprint("etsi014", __name__)


def _flows() -> Flows:
    return cast(Flows, current_app.config["kmstn.flows"])


def _caller(flows: Flows) -> str:
    sae = caller_identity(request.environ)
    flows.own_sae(sae)
    return sae


def _limits(flows: Flows, slave: str) -> etsi014.KeyLimits:
    lim = flows.limits(slave)
    return etsi014.KeyLimits(
        key_size=lim.key_size, min_key_size=lim.min_key_size, max_key_size=lim.max_key_size,
        max_key_per_request=lim.max_key_per_request, max_sae_id_count=lim.max_sae_id_count)


@blueprint.get("/api/v1/keys/<path:slave>/status")
def status(slave: str) -> Response:
    """Get status (clause 5.1): the path names the slave SAE."""
    flows = _flows()
    master = _caller(flows)
    with kmelog.log_context(sae_id=master):
        return json_response(flows.status(master, sae_id(slave)))


@blueprint.route("/api/v1/keys/<path:slave>/enc_keys", methods=["GET", "POST"])
def enc_keys(slave: str) -> Response:
    """Get key (clause 5.2): GET with number/size only, or POST a Key request."""
    flows = _flows()
    master = _caller(flows)
    slave = sae_id(slave)
    with kmelog.log_context(sae_id=master):
        limits = _limits(flows, slave)
        req = etsi014.read_key_request(request.method, request.args.to_dict(flat=False),
                                       request.get_data(), limits)
        etsi014.check_slaves(master, slave, req, limits)
        keys = flows.enc_keys(master, slave, req.number, req.size, req.additional_slave_sae_ids)
        return json_response(etsi014.key_container(keys))


@blueprint.route("/api/v1/keys/<path:master>/dec_keys", methods=["GET", "POST"])
def dec_keys(master: str) -> Response:
    """Get key with key IDs (clause 5.3): the caller is the slave, the path names the master."""
    flows = _flows()
    slave = _caller(flows)
    master = sae_id(master)
    with kmelog.log_context(sae_id=slave):
        key_ids = etsi014.read_key_ids(request.method, request.args.to_dict(flat=False),
                                       request.get_data())
        keys = flows.dec_keys(slave, master, key_ids)
        return json_response(etsi014.key_container(keys))
