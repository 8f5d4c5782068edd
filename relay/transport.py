"""One hop to a neighbour's ETSI 020 listener: the flows' Hop port, in the relay.

Toward a kmstn neighbour every message is sealed in the relay envelope
(with the request's deadline bound into it) and POSTed with media type
``application/vnd.kmstn.sealed+json`` over TLS 1.3 with X25519MLKEM768 only;
such exchanges are synchronous (the answer carries the ack containers).
Toward a foreign KMS on a site link the message is plain ETSI 020 JSON over
TLS 1.3 (hybrid group preferred, classical allowed): if the peer's
``/kmapi/versions`` lists ``synchronous_mode`` the request is synchronous;
otherwise it carries our ``ack_callback_url``, expects 202, and waits for
the peer's acks, which arrive at our 020 listener and are handed over by
:meth:`Transport.acks_arrived` (ETSI 020 clause 3, rule 6.3).

Every answer becomes acks or a typed error through relay/outcomes.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from kme import etsi020, metrics
from kme import log as kmelog
from kme.config import Kmstn, NodeConfig
from kme.errors import ErrorCode, KmstnError
from kme.etsi020 import AckContainer, ExtKeyContainer, VoidContainer
from kme.flows import AckMessage, DeviceKeysNotice, Outgoing
from kme.pqtls import CLIENT_GROUPS, SERVER_GROUPS, HttpResponse, PeerHttpClient
from kme.types import Deadline, NodeId
from relay.convert import Sealed
from relay.outcomes import read_answer

__all__ = ["DEADLINE_HEADER", "PATHS", "SealFn", "Transport", "encode"]

PATHS: Final = {
    "ext_keys": "/kmapi/v1/ext_keys",
    "void": "/kmapi/v1/ext_keys/void",
    "ack": "/kmapi/v1/ext_keys/ack",
    "device_keys": "/kmapi/v1/kmstn/device_keys",
}
# The request's absolute deadline (Unix ms), for the receiving listener's own
# call to its relay; the relay trusts only the copy bound into the envelope.
DEADLINE_HEADER: Final = "Kmstn-Deadline"
# seal(next_hop, message_type, body, hop, deadline) -> the envelope and the hop's kind
SealFn = Callable[[NodeId, str, bytes, int, Deadline], Sealed]
# Kept back from the deadline for reading the answer and passing it on.
_REPLY_MARGIN_S: Final = 0.05


def encode(message: Outgoing) -> tuple[str, bytes]:
    """The message type (endpoint) and ETSI 020 JSON body of ``message``."""
    if isinstance(message, ExtKeyContainer):
        return "ext_keys", etsi020.ext_keys_json(message)
    if isinstance(message, VoidContainer):
        return "void", etsi020.void_json(message)
    if isinstance(message, DeviceKeysNotice):
        return "device_keys", message.to_json()
    return "ack", etsi020.acks_json(message.acks)


@dataclass
class _Pending:
    """A request to a foreign KMS in asynchronous mode, waiting for its acks."""

    peer: NodeId
    remaining: set[uuid.UUID]
    acks: list[AckContainer] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


class Transport:
    def __init__(self, config: NodeConfig, seal: SealFn, log: logging.Logger | None = None,
                 kmstn_http: PeerHttpClient | None = None,
                 foreign_http: PeerHttpClient | None = None,
                 discard_sessions: Callable[[NodeId], None] | None = None) -> None:
        self._config = config
        self._seal = seal
        self._discard_sessions = discard_sessions
        self._log = log or logging.getLogger("kmstn.relay.transport")
        self._kmstn_http = kmstn_http or PeerHttpClient(config.tls, CLIENT_GROUPS)
        self._foreign_http = foreign_http or PeerHttpClient(config.tls, SERVER_GROUPS)
        self._neighbours = {link.other(config.node_id)
                            for link in config.topology.links_of(config.node_id)}
        # Each neighbour's link kind, for the hop metrics (a QKD link wins).
        self._kinds: dict[NodeId, metrics.LinkKind] = {}
        for link in config.topology.links_of(config.node_id):
            peer = link.other(config.node_id)
            if self._kinds.get(peer) != "qkd":
                self._kinds[peer] = link.kind
        self._pending: dict[uuid.UUID, _Pending] = {}
        self._lock = threading.Lock()
        self._sync_capable: dict[NodeId, bool] = {}

    def close(self) -> None:
        self._kmstn_http.close()
        self._foreign_http.close()

    def _neighbour(self, node: str) -> Kmstn:
        peer = self._config.topology.kmstns.get(NodeId(node))
        if peer is None or peer.id not in self._neighbours:
            raise KmstnError(ErrorCode.UNKNOWN_NODE, f"{node!r} is not a neighbour of "
                             f"{self._config.node_id}")
        return peer

    # -- the Hop port ----------------------------------------------------------------

    def send(self, peer: NodeId, message: Outgoing, hop: int, deadline: Deadline
             ) -> list[AckContainer]:
        node = self._neighbour(peer)
        message_type, body = encode(message)
        kind = self._kinds[node.id]
        started = time.monotonic()
        try:
            acks = self._send(node, message, message_type, body, hop, deadline)
        except KmstnError as exc:
            metrics.observe_hop(kind, "sent", message_type, exc.code.name,
                                time.monotonic() - started)
            raise
        metrics.observe_hop(kind, "sent", message_type, "ok", time.monotonic() - started)
        if isinstance(message, ExtKeyContainer):
            metrics.count_key_bits("relayed", sum(len(k.value) * 8 for k in message.keys), kind)
        return acks

    def _send(self, node: Kmstn, message: Outgoing, message_type: str, body: bytes, hop: int,
              deadline: Deadline) -> list[AckContainer]:
        url = node.etsi020_url + PATHS[message_type]
        if isinstance(message, AckMessage) and message.callback_url:
            url = message.callback_url  # validated by the 020 listener that got it
        if node.kind == "kmstn":
            return self._sealed(node, url, message_type, body, hop, deadline)
        if message_type == "device_keys":
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "device-keys notices are kmstn-only")
        if message_type == "ack" or self._synchronous(node, deadline):
            resp = self._post(self._foreign_http, node, url, body, etsi020.MEDIA_TYPE,
                              deadline)
            return read_answer(resp.status, resp.body, message_type)
        return self._asynchronous(node, url, message_type, body, deadline)

    def _post(self, http: PeerHttpClient, node: Kmstn, url: str, body: bytes,
              media_type: str, deadline: Deadline) -> HttpResponse:
        timeout = deadline.require(f"sending to {node.id}") - _REPLY_MARGIN_S
        return http.request("POST", url, node.id, body,
                            {"Content-Type": media_type,
                             DEADLINE_HEADER: str(deadline.unix_ms),
                             **kmelog.request_id_headers()},
                            max(timeout, 0.01))

    def _sealed(self, node: Kmstn, url: str, message_type: str, body: bytes, hop: int,
                deadline: Deadline) -> list[AckContainer]:
        onward = deadline.for_next_hop()
        for attempt in (1, 2):
            sealed = self._seal(node.id, message_type, body, hop, onward)
            resp = self._post(self._kmstn_http, node, url, sealed.envelope,
                              etsi020.SEALED_MEDIA_TYPE, deadline)
            try:
                return read_answer(resp.status, resp.body, message_type)
            except KmstnError as exc:
                if attempt == 2 or exc.code is not ErrorCode.UNKNOWN_SESSION:
                    raise
                # The neighbour's relay restarted and forgot the one-time keys
                # we pooled: drop them and seal once more with fresh ones.
                self._log.warning("neighbour forgot our KEM sessions; retrying",
                                  extra={"peer": node.id})
                if self._discard_sessions is not None:
                    self._discard_sessions(node.id)
        raise AssertionError("unreachable")

    def _synchronous(self, peer: Kmstn, deadline: Deadline) -> bool:
        """Does a foreign KMS advertise synchronous_mode? (asked once per peer)."""
        known = self._sync_capable.get(peer.id)
        if known is None:
            resp = self._foreign_http.request("GET", peer.etsi020_url + "/kmapi/versions",
                                              peer.id, timeout=deadline.require("versions"))
            try:
                caps = json.loads(resp.body).get("capabilities", []) if resp.status == 200 else []
            except (ValueError, AttributeError):
                caps = []
            known = "synchronous_mode" in caps
            self._sync_capable[peer.id] = known
        return known

    def _asynchronous(self, peer: Kmstn, url: str, message_type: str, body: bytes,
                      deadline: Deadline) -> list[AckContainer]:
        doc = json.loads(body)
        doc["ack_callback_url"] = self._config.node.etsi020_url + PATHS["ack"]
        key_ids = ([uuid.UUID(k["key_id"]) for k in doc["keys"]] if message_type == "ext_keys"
                   else [uuid.UUID(k) for k in doc["key_ids"]])
        waiter = _Pending(peer.id, set(key_ids))
        with self._lock:
            if any(k in self._pending for k in key_ids):
                raise KmstnError(ErrorCode.KEY_CONFLICT, "a request for these keys is pending")
            for k in key_ids:
                self._pending[k] = waiter
        try:
            resp = self._post(self._foreign_http, peer, url,
                              json.dumps(doc, separators=(",", ":")).encode(),
                              etsi020.MEDIA_TYPE, deadline)
            if resp.status != 202:
                return read_answer(resp.status, resp.body, message_type)
            if not key_ids:  # void of all keys: no key list to wait for
                return []
            if not waiter.done.wait(max(0.0, deadline.remaining())):
                raise KmstnError(ErrorCode.TIMEOUT, "no ack from the foreign KMS in time")
            return list(waiter.acks)
        finally:
            with self._lock:
                for k in key_ids:
                    if self._pending.get(k) is waiter:
                        del self._pending[k]

    def acks_arrived(self, peer: NodeId, acks: Sequence[AckContainer]) -> list[uuid.UUID]:
        """Hand acks that arrived at our ack endpoint to the waiting send; return unknown IDs."""
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
