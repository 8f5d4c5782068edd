"""One end (Alice or Bob) of an emulated QKD device pair: its ETSI 014 API.

The end serves the three 014 methods (clause 5) for exactly one SAE: the
KMSTN beside it, identified by ``sae_id`` of this end in the topology. The
caller's SAE ID is the subject CN of its verified client certificate
(clause 2); anyone else gets 401. The peer SAE in the path must be the SAE
of the other end: a vendor device knows only the two KMSTNs of its link,
which is why the node strips overlay-only fields before asking it (paper
IV-A.1, ``kme.qkd.sanitize``).

Order of checks: identity (401), outage window (503), endpoint and path
(400), request body (400), the key store (400 not found / 503 too little
key). The messages are kme.etsi014's; the status codes come from the small
table below (the emulated vendor's, 200/400/401/503 only).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final
from urllib.parse import parse_qs, unquote

from kme import etsi014
from kme.config import QkdLink
from kme.errors import ErrorCode, KmstnError
from lab.qkdsim.config import HEALTH_PATH
from lab.qkdsim.httpserver import Request, Response
from lab.qkdsim.store import End, KeyStream

__all__ = ["OUTAGE_DETAIL", "DeviceKme"]

API_PREFIX: Final = "/api/v1/keys/"
# Error ``details`` entry that marks a 503 as an emulated link outage, so a
# client can tell "link down" from "store empty".
OUTAGE_DETAIL: Final = "link_outage"
_OPS: Final = ("status", "enc_keys", "dec_keys")

# The emulated vendor's status codes (ETSI 014 clause 5: 200/400/401/503
# only). Deliberately its own small table, not gateway/errors.py: a vendor
# device is not part of the node, and kme does not import the gateway.
_HTTP_STATUS: Final = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.SIZE_NOT_MULTIPLE_OF_8: 400,
    ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION: 400,
    ErrorCode.UNSATISFIED_MANDATORY_EXTENSION: 400,
    ErrorCode.UNKNOWN_SAE: 400,
    ErrorCode.KEY_NOT_FOUND: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 401,
}


def _bad(message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> KmstnError:
    return etsi014.Etsi014Error(code, message)


def _json(status: int, body: dict[str, Any], close: bool = False) -> Response:
    return Response(status, json.dumps(body, separators=(",", ":")).encode(), close)


def _query(text: str) -> dict[str, list[str]]:
    try:
        return parse_qs(text, keep_blank_values=True, strict_parsing=False, max_num_fields=16)
    except ValueError:
        raise _bad("too many query parameters") from None


class DeviceKme:
    """The ETSI 014 API of one end; ``handle`` is the listener's request handler."""

    def __init__(self, end: End, link: QkdLink, stream: KeyStream, log: logging.Logger) -> None:
        node = link.a if end == "alice" else link.b
        own, peer = link.device_of(node), link.peer_device_of(node)
        self.end = end
        self.link = link
        self.own = own
        self.peer = peer
        self.stream = stream
        self.log = log
        # max_SAE_ID_count 0: a point-to-point device cannot multicast keys.
        self.limits = etsi014.KeyLimits(
            key_size=link.key_size, min_key_size=link.min_key_size,
            max_key_size=link.max_key_size, max_key_per_request=link.max_key_per_request,
            max_sae_id_count=0, bytes_only=True)
        self._debug = log.isEnabledFor(logging.DEBUG)

    # -- entry point -------------------------------------------------------------------

    def handle(self, req: Request, caller: str | None) -> Response:
        try:
            response = self._route(req, caller)
        except KmstnError as exc:
            response = self._error(exc, req, caller)
        if self._debug:
            self.log.debug("request", extra={"end": self.end, "method": req.method,
                                             "path": req.path, "sae_id": caller,
                                             "status": response.status})
        return response

    def _error(self, exc: KmstnError, req: Request, caller: str | None) -> Response:
        status = _HTTP_STATUS.get(exc.code, 503)  # anything else is server-side: 503
        message = "internal error" if exc.code is ErrorCode.INTERNAL else exc.public
        body = etsi014.error_body(message, getattr(exc, "details", None))
        # Refused identities and outages are worth a line at info; a bad
        # request or an empty store is the client's everyday business.
        level = logging.INFO if status == 401 or exc.code in (
            ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL) else logging.DEBUG
        if self.log.isEnabledFor(level):
            self.log.log(level, "request refused", extra={
                "end": self.end, "path": req.path, "sae_id": caller, "status": status,
                "error_code": exc.code.name, "error": exc.public, "cause": exc.cause})
        return _json(status, body)

    def _route(self, req: Request, caller: str | None) -> Response:
        if req.path == HEALTH_PATH:
            if req.method != "GET":
                raise _bad(f"method {req.method} not allowed on {HEALTH_PATH}")
            return _json(200, self.health())
        if not req.path.startswith(API_PREFIX):
            raise _bad("no such endpoint")
        segment, _, op = req.path[len(API_PREFIX):].partition("/")
        if op not in _OPS:
            raise _bad("no such endpoint")
        # ETSI 014 clause 2: the SAE ID comes from the verified certificate.
        if caller != self.own.sae_id:
            raise etsi014.Etsi014Error(ErrorCode.UNAUTHENTICATED, etsi014.MSG_UNAUTHORIZED,
                                       cause=f"client CN {caller!r} is not {self.own.sae_id!r}")
        if self.stream.in_outage():
            raise etsi014.Etsi014Error(
                ErrorCode.UNAVAILABLE, "the QKD link is down",
                details=[{OUTAGE_DETAIL: "the emulated link is in an outage window"}])
        peer_sae = unquote(segment)
        if op == "status":
            if req.method != "GET":
                raise _bad("status takes GET only")
            return self._status(caller, peer_sae)
        if req.method not in ("GET", "POST"):
            raise _bad(f"{op} takes GET or POST")
        if req.method == "POST" and req.query:
            raise _bad("with POST, send the request fields in the JSON body, not the query")
        if op == "enc_keys":
            return self._enc_keys(req, caller, peer_sae)
        return self._dec_keys(req, caller, peer_sae)

    # -- the three methods --------------------------------------------------------------

    def _slave(self, master: str, raw: str, req: etsi014.KeyRequest) -> str:
        """Clause 5.1/5.2 path slave: valid, not the caller, and the peer end's SAE."""
        slave = etsi014.path_sae_id(raw, "slave")
        etsi014.check_slaves(master, slave, req, self.limits)
        if slave != self.peer.sae_id:
            raise _bad("the slave SAE ID is not served by the peer KME of this QKD link",
                       ErrorCode.UNKNOWN_SAE)
        return slave

    def _status(self, master: str, raw_slave: str) -> Response:
        slave = self._slave(master, raw_slave, etsi014.KeyRequest())
        status = etsi014.Status.of(
            source_kme_id=self.own.kme_id, target_kme_id=self.peer.kme_id,
            master_sae_id=master, slave_sae_id=slave, limits=self.limits,
            stored_key_count=self.stream.stored_key_count(self.link.key_size),
            max_key_count=self.link.max_key_count)
        return _json(200, etsi014.status_body(status))

    def _enc_keys(self, req: Request, master: str, raw_slave: str) -> Response:
        if req.method == "GET":
            key_req = etsi014.parse_key_request_query(_query(req.query), self.limits)
        else:
            key_req = etsi014.parse_key_request_body(req.body, self.limits)
        slave = self._slave(master, raw_slave, key_req)
        keys = self.stream.issue(self.end, master, slave, key_req.number, key_req.size)
        return _json(200, etsi014.key_container(keys))

    def _dec_keys(self, req: Request, slave: str, raw_master: str) -> Response:
        master = etsi014.path_sae_id(raw_master, "master")
        if req.method == "GET":
            key_ids = etsi014.parse_key_ids_query(_query(req.query))
        else:
            key_ids = etsi014.parse_key_ids_body(req.body)
        if master != self.peer.sae_id:
            raise etsi014.keys_not_found(cause=f"master {master!r} is not the peer SAE")
        keys = self.stream.take(self.end, master, slave, key_ids)
        return _json(200, etsi014.key_container(keys))

    # -- health ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """GET /healthz: liveness for launchers, plus the store's counters (no key data)."""
        now = self.stream.tick()
        stats = self.stream.stats(catch_up=False)  # counters and uptime from one instant
        return {
            "status": "ok",
            "link": self.link.id,
            "end": self.end,
            "kme_id": self.own.kme_id,
            "uptime_s": now - self.stream.start,
            "outage": self.stream.in_outage(now),
            "stored_key_count": stats.stored_bits // self.link.key_size,
            "max_key_count": self.link.max_key_count,
            "generated_bits": stats.generated_bits,
            "dropped_bits": stats.dropped_bits,
            "delivered_bits": stats.delivered_bits,
            "stored_bits": stats.stored_bits,
            "blocks": stats.blocks,
            "pending_keys": stats.pending,
            "expired_keys": stats.expired_keys,
        }
