"""Sending ETSI 020 messages to a neighbour's 020 listener (Relay.Forward / SendAck / DeliverAck).

Toward a kmstn neighbour every body is sealed in the relay envelope and
POSTed with media type ``application/vnd.kmstn.sealed+json`` over TLS 1.3
with X25519MLKEM768 only; such exchanges are synchronous (the answer carries
the ack containers). Toward a foreign KMS on a site link the body is plain
ETSI 020 JSON over TLS 1.3 (hybrid group preferred, classical allowed): if
the peer's ``/kmapi/versions`` lists ``synchronous_mode`` the request is
synchronous; otherwise this module adds our ``ack_callback_url``, expects
202, and waits for the peer's acks, which the 020 listener hands over
through :meth:`Forwarder.deliver_ack` (ETSI 020 clause 3, rule 6.3).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kme import etsi020
from kme.config import Kmstn, NodeConfig
from kme.errors import ErrorCode, KmstnError
from kme.pqtls import CLIENT_GROUPS, SERVER_GROUPS, PeerHttpClient
from kme.types import NodeId

__all__ = ["PATHS", "Forwarder", "SealFn"]

PATHS = {
    "ext_keys": "/kmapi/v1/ext_keys",
    "void": "/kmapi/v1/ext_keys/void",
    "ack": "/kmapi/v1/ext_keys/ack",
    "device_keys": "/kmapi/v1/kmstn/device_keys",
}
# seal(next_hop, message_type, body, hop) -> envelope bytes
SealFn = Callable[[NodeId, str, bytes, int], bytes]


@dataclass
class _Pending:
    """A request to a foreign KMS in asynchronous mode, waiting for its acks."""

    peer: NodeId
    remaining: set[uuid.UUID]
    acks: list[etsi020.AckContainer] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, slots=True)
class Forwarded:
    http_status: int
    body: bytes
    acks: tuple[etsi020.AckContainer, ...] = ()


def _unknown_session(status: int, body: bytes) -> bool:
    if status != 400:
        return False
    try:
        details = json.loads(body).get("details", {})
    except (ValueError, AttributeError):
        return False
    return isinstance(details, dict) and "unknown_session" in details


class Forwarder:
    def __init__(self, config: NodeConfig, seal: SealFn, log: logging.Logger | None = None,
                 kmstn_http: PeerHttpClient | None = None,
                 foreign_http: PeerHttpClient | None = None,
                 discard_sessions: Callable[[NodeId], None] | None = None) -> None:
        self._config = config
        self._seal = seal
        self._discard_sessions = discard_sessions
        self._log = log or logging.getLogger("kmstn.relay.forward")
        self._kmstn_http = kmstn_http or PeerHttpClient(config.tls, CLIENT_GROUPS)
        self._foreign_http = foreign_http or PeerHttpClient(config.tls, SERVER_GROUPS)
        self._neighbours = {link.other(config.node_id)
                            for link in config.topology.links_of(config.node_id)}
        self._pending: dict[uuid.UUID, _Pending] = {}
        self._lock = threading.Lock()
        self._sync_capable: dict[NodeId, bool] = {}
        self._default_timeout = config.relay.timeout_ms / 1000

    def close(self) -> None:
        self._kmstn_http.close()
        self._foreign_http.close()

    def _neighbour(self, node: str) -> Kmstn:
        peer = self._config.topology.kmstns.get(NodeId(node))
        if peer is None or peer.id not in self._neighbours:
            raise KmstnError(ErrorCode.UNKNOWN_NODE, f"{node!r} is not a neighbour of "
                             f"{self._config.node_id}")
        return peer

    # -- Forward -------------------------------------------------------------------

    def forward(self, next_hop: str, message_type: str, body: bytes, hop: int,
                timeout: float | None = None) -> Forwarded:
        if message_type not in PATHS:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, f"unknown message type {message_type!r}")
        timeout = timeout or self._default_timeout
        peer = self._neighbour(next_hop)
        url = peer.etsi020_url + PATHS[message_type]
        if peer.kind == "kmstn":
            for attempt in (1, 2):
                envelope = self._seal(peer.id, message_type, body, hop)
                resp = self._kmstn_http.request(
                    "POST", url, peer.id, envelope,
                    {"Content-Type": etsi020.SEALED_MEDIA_TYPE}, timeout)
                if attempt == 1 and _unknown_session(resp.status, resp.body):
                    # The neighbour's relay restarted and forgot the one-time
                    # keys we pooled: drop them and seal once more with fresh ones.
                    self._log.warning("neighbour forgot our KEM sessions; retrying",
                                      extra={"peer": peer.id})
                    if self._discard_sessions is not None:
                        self._discard_sessions(peer.id)
                    continue
                break
            return Forwarded(resp.status, resp.body)
        if message_type == "device_keys":
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "device-keys notices are kmstn-only")
        if message_type == "ack" or self._synchronous(peer, timeout):
            resp = self._foreign_http.request("POST", url, peer.id, body,
                                              {"Content-Type": etsi020.MEDIA_TYPE}, timeout)
            return Forwarded(resp.status, resp.body)
        return self._asynchronous(peer, url, message_type, body, timeout)

    def _synchronous(self, peer: Kmstn, timeout: float) -> bool:
        """Does a foreign KMS advertise synchronous_mode? (asked once per peer)."""
        known = self._sync_capable.get(peer.id)
        if known is None:
            resp = self._foreign_http.request("GET", peer.etsi020_url + "/kmapi/versions",
                                              peer.id, timeout=timeout)
            try:
                caps = json.loads(resp.body).get("capabilities", []) if resp.status == 200 else []
            except (ValueError, AttributeError):
                caps = []
            known = "synchronous_mode" in caps
            self._sync_capable[peer.id] = known
        return known

    def _asynchronous(self, peer: Kmstn, url: str, message_type: str, body: bytes,
                      timeout: float) -> Forwarded:
        doc = json.loads(body)
        doc["ack_callback_url"] = self._config.node.etsi020_url + PATHS["ack"]
        key_ids = ([uuid.UUID(k["key_id"]) for k in doc["keys"]] if message_type == "ext_keys"
                   else [uuid.UUID(k) for k in doc["key_ids"]])
        waiter = _Pending(peer.id, set(key_ids))
        with self._lock:
            clash = [k for k in key_ids if k in self._pending]
            if clash:
                raise KmstnError(ErrorCode.KEY_CONFLICT, "a request for these keys is pending")
            for k in key_ids:
                self._pending[k] = waiter
        try:
            start = time.monotonic()
            resp = self._foreign_http.request(
                "POST", url, peer.id, json.dumps(doc, separators=(",", ":")).encode(),
                {"Content-Type": etsi020.MEDIA_TYPE}, timeout)
            if resp.status != 202:
                return Forwarded(resp.status, resp.body)
            if not key_ids:  # void of all keys: no key list to wait for
                return Forwarded(resp.status, resp.body)
            if not waiter.done.wait(max(0.0, timeout - (time.monotonic() - start))):
                raise KmstnError(ErrorCode.TIMEOUT, "no ack from the foreign KMS in time")
            return Forwarded(202, b"", tuple(waiter.acks))
        finally:
            with self._lock:
                for k in key_ids:
                    if self._pending.get(k) is waiter:
                        del self._pending[k]

    # -- acks ----------------------------------------------------------------------

    def deliver_ack(self, peer: str, acks: Sequence[etsi020.AckContainer]) -> list[uuid.UUID]:
        """Hand acks that arrived at our ack endpoint to the waiting Forward; return unknown IDs."""
        unknown: list[uuid.UUID] = []
        with self._lock:
            for ack in acks:
                waiter = None
                for k in ack.key_ids:
                    w = self._pending.get(k)
                    if w is None or w.peer != peer:
                        unknown.append(k)
                    else:
                        waiter = w
                        w.remaining.discard(k)
                if waiter is not None:
                    waiter.acks.append(ack)
            for w in {id(w): w for w in self._pending.values()}.values():
                if not w.remaining:
                    w.done.set()
        return unknown

    def send_ack(self, peer: str, callback_url: str,
                 acks: Sequence[etsi020.AckContainer]) -> int:
        """POST acks to a neighbour's ack_callback_url (validated by the 020 listener)."""
        node = self._neighbour(peer)
        body = etsi020.acks_json(acks)
        if node.kind == "kmstn":
            envelope = self._seal(node.id, "ack", body, 1)
            resp = self._kmstn_http.request("POST", callback_url, node.id, envelope,
                                            {"Content-Type": etsi020.SEALED_MEDIA_TYPE},
                                            self._default_timeout)
        else:
            resp = self._foreign_http.request("POST", callback_url, node.id, body,
                                              {"Content-Type": etsi020.MEDIA_TYPE},
                                              self._default_timeout)
        return resp.status
