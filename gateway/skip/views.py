"""SKIP, the Secure Key Integration Protocol (draft-cisco-skip-02), over kme.flows.

Some encryptors (IKEv2 with RFC 8784 PPKs, MACsec) speak SKIP instead of ETSI
014. SKIP is the same two-call model: the initiating system asks its Key
Provider for a new key for a remote system, passes the key ID in its own
protocol, and the responder asks its own Key Provider for that key ID. So a
SKIP system is an SAE here, and each call is translated to the flows ETSI 014
uses, with the same identities, routes, take-once rule and errors:

| SKIP                                   | kmstn                                        |
|----------------------------------------|----------------------------------------------|
| GET /capabilities                      | the caller and the SAEs it may share keys with |
| GET /key?remoteSystemID=R[&size=N]     | enc_keys, master = caller, slave = R, 1 key  |
| GET /key/{keyId}?remoteSystemID=I      | dec_keys, slave = caller, master = I         |
| GET /entropy[?minentropy=N]            | N random bits from the OS CSPRNG (not key)   |

The caller is the CN of its verified client certificate, as for ETSI 014 (the
draft's TLS-PSK variant is not offered: the listener is mutual TLS). SKIP
carries ``keyId`` and ``key`` as hexadecimal strings: ``keyId`` is the kmstn
key ID (a UUID) as 32 hex digits; a dashed UUID is accepted back too. Errors
are ``{"message": ...}`` with the SKIP status of gateway/errors.py
(400 bad request, 401 not this caller's, 404 no such key, 503 not now).
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from typing import cast

from flask import Blueprint, Response, current_app, request

import kme.etsi014 as etsi014
from gateway.app import json_response
from gateway.auth import caller_identity
from gateway.deps import Edge
from gateway.errors import skip_error
from kme import flows as kflows
from kme import log as kmelog
from kme.errors import ErrorCode, KmstnError
from kme.flows import limits_for, own_sae
from kme.types import Deadline, Key, sae_id

blueprint = Blueprint("skip", __name__)
log = logging.getLogger("kmstn.gateway.skip")

# Entropy requests are bounded: randomness, not a bulk data service.
MAX_ENTROPY_BITS = 8192
_HEX_ID = re.compile(r"[0-9a-fA-F]{32}")
_BITS = re.compile(r"[0-9]{1,5}")


def _bad(message: str) -> KmstnError:
    return KmstnError(ErrorCode.INVALID_ARGUMENT, message)


def _edge() -> Edge:
    return cast(Edge, current_app.config["kmstn.edge"])


def _caller(flows: Edge) -> str:
    sae = caller_identity(request.environ)
    own_sae(flows.config, sae, flows.routes)
    return sae


def _only(allowed: set[str]) -> None:
    extra = sorted(set(request.args) - allowed)
    if extra:
        raise _bad(f"query parameter {extra[0][:64]!r} is not part of this SKIP request")


def _one(name: str, required: bool = True) -> str | None:
    values = request.args.getlist(name)
    if not values:
        if required:
            raise _bad(f"{name} is required")
        return None
    if len(values) != 1 or not values[0]:
        raise _bad(f"{name} must be given once, not empty")
    return values[0]


def _remote() -> str:
    try:
        return sae_id(_one("remoteSystemID") or "")
    except KmstnError:
        raise _bad("remoteSystemID must be a system ID (1-64 URI characters)") from None


def _key_body(key: Key) -> Response:
    return json_response({"keyId": key.key_id.hex, "key": key.material.reveal().hex()})


@blueprint.errorhandler(KmstnError)
def on_error(exc: KmstnError) -> Response:
    level = logging.WARNING if exc.code in (ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE,
                                            ErrorCode.TIMEOUT) else logging.INFO
    log.log(level, "request failed", extra={"path": request.path, "error_code": exc.code.name,
                                            "error": exc.public, "cause": exc.cause})
    status, body = skip_error(exc)
    return json_response(body, status)


@blueprint.get("/capabilities")
def capabilities() -> Response:
    """What this Key Provider offers the caller: keys, entropy, and its peers."""
    flows = _edge()
    caller = _caller(flows)
    _only(set())
    # Learned from link state: a node file names only this node's SAEs.
    known = flows.routes.known_saes() if flows.routes is not None else flows.config.topology.saes
    peers = sorted(s for s in known if s != caller)
    return json_response({"entropy": True, "key": True,
                          "algorithm": "QKD relayed hop by hop, each hop QKD XOR ML-KEM-768 "
                                       "or ML-KEM-768",
                          "localSystemID": caller, "remoteSystemID": peers})


@blueprint.get("/key")
def new_key() -> Response:
    """A new key for the caller and remoteSystemID (ETSI 014 enc_keys, one key)."""
    flows = _edge()
    master = _caller(flows)
    _only({"remoteSystemID", "size"})
    slave = _remote()
    with kmelog.log_context(sae_id=master):
        assert flows.routes is not None  # noqa: S101 - the 014 edge is built with routes
        lim, _ = limits_for(flows.config, flows.routes, slave)
        limits = etsi014.KeyLimits(lim.key_size, lim.min_key_size, lim.max_key_size, 1, 0)
        size = _one("size", required=False)
        # The size rules of ETSI 014 (clause 4.2: whole bytes, the link's bounds).
        req = etsi014.parse_key_request_query({"size": [size]} if size is not None else {},
                                              limits)
        etsi014.check_slaves(master, slave, req, limits)
        deadline = Deadline.after(flows.config.gateway.relay_timeout_ms / 1000)
        (key,) = flows.relay.get_keys(master, [slave], 1, req.size, deadline)
        return _key_body(key)


@blueprint.get("/key/<key_id>")
def key_by_id(key_id: str) -> Response:
    """The key with this ID, for the caller (ETSI 014 dec_keys; remoteSystemID is the
    system that asked for it)."""
    flows = _edge()
    slave = _caller(flows)
    _only({"remoteSystemID"})
    master = _remote()
    if _HEX_ID.fullmatch(key_id):
        wanted = uuid.UUID(hex=key_id)
    else:
        try:
            wanted = uuid.UUID(key_id)
        except ValueError:
            raise _bad("keyId must be 32 hexadecimal digits") from None
    with kmelog.log_context(sae_id=slave):
        assert flows.vault is not None  # noqa: S101 - the 014 edge is built with the keyvault
        (key,) = kflows.dec_keys(flows.config, flows.vault.take, slave, master, [wanted],
                                 flows.routes)
        return _key_body(key)


@blueprint.get("/entropy")
def entropy() -> Response:
    """Random bits from the operating system's CSPRNG (never key material of a link)."""
    _caller(_edge())
    _only({"minentropy"})
    raw = _one("minentropy", required=False)
    bits = 256
    if raw is not None:
        if not _BITS.fullmatch(raw) or not 8 <= int(raw) <= MAX_ENTROPY_BITS or int(raw) % 8:
            raise _bad(f"minentropy must be a multiple of 8 from 8 to {MAX_ENTROPY_BITS}")
        bits = int(raw)
    return json_response({"randomStr": secrets.token_hex(bits // 8), "minentropy": bits})
