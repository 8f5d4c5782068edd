"""Sealing and opening hops in-process: the cryptography of one hop.

In-process API (what the transport, ``Relay.Receive`` and the benchmark build on):

* :class:`Sealer` -- ``seal(next_hop, message_type, body, hop) -> bytes``:
  fresh ML-KEM-768 secret with the next hop (a one-time key from its pool,
  or the explicit Encapsulated exchange), a QKD key on a QKD hop, AES-256-GCM
  envelope. Every seal logs one ``sealed`` line naming the session (never a
  secret): that log is the sender's record of used sessions.
* :class:`Opener` -- ``open(peer, message_type, envelope) -> Opened``:
  strict parse, binding checks (dst is us, src is the TLS-verified peer,
  type is the endpoint's, alg is allowed on our links, sae is the sender's
  device), one-time session, QKD key by ID, AES-GCM. Every failure is a
  KmstnError; nothing is half done.
* :class:`PeerPools` -- the sender's per-neighbour :class:`KeyPool` objects
  and mTLS channels to the neighbours' RelayPeer services.

The gRPC servicers are in relay/service.py (internal) and relay/peer.py
(neighbour-facing).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import grpc

from kme.config import NodeConfig
from kme.errors import ErrorCode, KmstnError
from kme.types import Deadline, NodeId
from relay import envelope as env
from relay import kem
from relay.convert import HopKind, Opened, Sealed
from relay.hopkey import (
    KEYLESS_TYPES,
    DeviceDirectory,
    HopLinks,
    QkdMaterial,
    combine,
    fetch_qkd_key,
    take_qkd_key,
)
from relay.kempool import KeyPool
from relay.peer import RelayPeerClient, peer_channel
from relay.qkdreserve import QkdReservePool, ReservedQkdKeys

__all__ = [
    "Opener",
    "PeerPools",
    "Sealer",
]

ExchangeMode = Literal["pipelined", "explicit"]


class PeerPools:
    """The sender's side of the KEM exchange with every neighbour, over mTLS.

    Pools and channels are made on first use; refills run on one small
    executor shared by all neighbours.
    """

    def __init__(self, config: NodeConfig, links: HopLinks,
                 log: logging.Logger | None = None,
                 client_factory: Callable[[NodeId], RelayPeerClient] | None = None,
                 devices: DeviceDirectory | None = None) -> None:
        self._config = config
        self._devices = devices
        self._qkd_pools: dict[NodeId, QkdReservePool | None] = {}
        self._links = links
        self._log = log or logging.getLogger("kmstn.relay")
        self._size = config.relay.kem_pool_size
        self._timeout = config.relay.timeout_ms / 1000
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="relay-kem-refill")
        self._lock = threading.Lock()
        self._pools: dict[NodeId, KeyPool] = {}
        self._clients: dict[NodeId, RelayPeerClient] = {}
        self._channels: list[grpc.Channel] = []
        self._client_factory = client_factory or self._mtls_client

    def _mtls_client(self, peer: NodeId) -> RelayPeerClient:
        channel = peer_channel(self._config, peer)
        self._channels.append(channel)
        return RelayPeerClient(channel, self._timeout)

    def client(self, peer: NodeId) -> RelayPeerClient:
        with self._lock:
            found = self._clients.get(peer)
            if found is None:
                found = self._clients[peer] = self._client_factory(peer)
            return found

    def pool(self, peer: NodeId) -> KeyPool:
        peer = self._links.require_neighbour(peer)
        with self._lock:
            found = self._pools.get(peer)
            if found is None:
                found = self._pools[peer] = KeyPool(
                    peer, lambda n: self.client(peer).public_keys(n), self._size,
                    self._executor, log=self._log)
            return found

    def qkd_pool(self, peer: NodeId) -> QkdReservePool | None:
        """QKD hop keys held for ``peer`` ahead of use (None without a QKD link or pool)."""
        with self._lock:
            if peer in self._qkd_pools:
                return self._qkd_pools[peer]
        size = self._config.relay.qkd_reserve
        device = self._devices.toward(peer) if self._devices is not None else None
        pool = None
        if size and device is not None and self._links.qkd_link(peer) is not None:
            pool = QkdReservePool(peer, device,
                                  lambda ids: self.client(peer).reserve_qkd_keys(ids), size,
                                  self._executor, log=self._log)
        with self._lock:
            return self._qkd_pools.setdefault(peer, pool)

    def encapsulated(self, peer: NodeId, session: uuid.UUID, ciphertext: bytes) -> None:
        self.client(peer).encapsulated(session, ciphertext)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for channel in self._channels:
                channel.close()
            self._channels.clear()
            self._clients.clear()
            self._pools.clear()
            self._qkd_pools.clear()


class Sealer:
    """Seal ETSI 020 messages for neighbours (the sending half of a hop)."""

    def __init__(self, links: HopLinks, pools: PeerPools | Callable[[NodeId], KeyPool],
                 devices: DeviceDirectory | None, log: logging.Logger | None = None,
                 exchange: ExchangeMode = "pipelined",
                 encapsulated: Callable[[NodeId, uuid.UUID, bytes], None] | None = None) -> None:
        self._links = links
        self._pool: Callable[[NodeId], KeyPool]
        self._qkd_pool: Callable[[NodeId], QkdReservePool | None] = lambda _peer: None
        if isinstance(pools, PeerPools):
            self._pool = pools.pool
            self._qkd_pool = pools.qkd_pool
            encapsulated = encapsulated or pools.encapsulated
        else:
            self._pool = pools
        self._devices = devices
        self._log = log or logging.getLogger("kmstn.relay")
        if exchange == "explicit" and encapsulated is None:
            raise ValueError("the explicit exchange needs an encapsulated() sender")
        self._exchange = exchange
        self._encapsulated = encapsulated

    def _hop_qkd_key(self, peer: NodeId) -> QkdMaterial | None:
        """A QKD key the neighbour already holds if we have one, else one from the device."""
        if self._links.qkd_link(peer) is not None:
            pool = self._qkd_pool(peer)
            held = pool.take() if pool is not None else None
            if held is not None:
                return QkdMaterial(held, self._links.own_device_sae(peer))
        return take_qkd_key(self._links, self._devices, peer)

    def seal(self, next_hop: str, message_type: str, body: bytes, hop: int,
             deadline: Deadline | None = None) -> bytes:
        """The envelope for ``body`` toward ``next_hop`` (what the transport POSTs)."""
        return self.seal_detailed(next_hop, message_type, body, hop, deadline).envelope

    def discard_keys(self, next_hop: str) -> None:
        """Forget the one-time keys held for ``next_hop``.

        Call this when the neighbour answers UNKNOWN_SESSION for a fresh
        envelope: it has most likely restarted and forgotten every session it
        handed out, so the rest of the pool would fail the same way.
        """
        peer = self._links.require_neighbour(next_hop)
        self._pool(peer).clear()
        qkd = self._qkd_pool(peer)
        if qkd is not None:
            qkd.clear()  # the neighbour forgot the QKD keys we announced, too

    def seal_detailed(self, next_hop: str, message_type: str, body: bytes, hop: int,
                      deadline: Deadline | None = None) -> Sealed:
        if message_type not in env.MESSAGE_TYPES:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, f"unknown message type {message_type!r}")
        if not 1 <= hop <= env.MAX_HOP:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "hop must be at least 1")
        if len(body) > env.MAX_ENVELOPE_BYTES // 2:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "message too large to relay")
        peer = self._links.require_neighbour(next_hop)
        # The one-time key is taken before the QKD key: losing a public key
        # to a later failure costs nothing, losing a QKD key costs key rate.
        one_time = self._pool(peer).take()
        kem_secret, kem_ciphertext = kem.encapsulate(one_time.public_key)
        carried: bytes | None = kem_ciphertext
        if self._exchange == "explicit":
            assert self._encapsulated is not None  # noqa: S101 - checked in __init__
            self._encapsulated(peer, one_time.session, kem_ciphertext)
            carried = None
        qkd = None if message_type in KEYLESS_TYPES else self._hop_qkd_key(peer)
        header = env.Header(
            alg=env.ALG_QKD if qkd else env.ALG_PQC,
            session=one_time.session,
            src=self._links.node,
            dst=peer,
            hop=hop,
            type=message_type,
            kem_ciphertext=carried,
            qkd_key_id=qkd.key.key_id if qkd else None,
            sae=qkd.sae if qkd else None,
            deadline=deadline.unix_ms if deadline is not None else None,
        )
        key = combine(kem_secret, qkd.key.material if qkd else None)
        sealed = env.seal(header, key, body, os.urandom(env.IV_BYTES))
        kind: HopKind = "qkd" if qkd else "pqc"
        self._log.info("sealed", extra={
            "peer": peer, "session": str(one_time.session), "kind": kind, "hop": hop,
            "message_type": message_type, "exchange": self._exchange,
            "qkd_key_id": str(qkd.key.key_id) if qkd else None})
        return Sealed(sealed, kind, one_time.session)


class Opener:
    """Open envelopes from neighbours (the receiving half of a hop)."""

    def __init__(self, links: HopLinks, sessions: kem.SessionStore,
                 devices: DeviceDirectory | None, log: logging.Logger | None = None,
                 reserved: ReservedQkdKeys | None = None) -> None:
        self._links = links
        self._sessions = sessions
        self._devices = devices
        self._reserved = reserved
        self._log = log or logging.getLogger("kmstn.relay")

    def open(self, peer: str, message_type: str, envelope: bytes) -> Opened:
        """The inner ETSI 020 message of ``envelope``, sent by ``peer`` to the
        endpoint for ``message_type``; raises KmstnError on any failure."""
        try:
            return self._open(peer, message_type, envelope)
        except KmstnError as exc:
            self._log.warning("envelope rejected", extra={
                "peer": peer, "message_type": message_type, "error_code": exc.code.name,
                "error": exc.public})
            raise

    def _open(self, peer_name: str, message_type: str, data: bytes) -> Opened:
        peer = self._links.require_neighbour(peer_name)
        if message_type not in env.MESSAGE_TYPES:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, f"unknown message type {message_type!r}")
        sealed = env.parse(data)
        h = sealed.header
        me = self._links.node
        # These checks read the header before it is authenticated; a match is
        # confirmed by the AES-GCM tag below, a mismatch is refused at once.
        if h.dst != me:
            raise KmstnError(ErrorCode.TAMPERED, f"envelope is addressed to {h.dst}, not {me}",
                             reason="wrong_destination")
        if h.src != peer:
            raise KmstnError(ErrorCode.TAMPERED,
                             f"envelope claims source {h.src} but came from {peer}",
                             reason="wrong_source")
        if h.type != message_type:
            raise KmstnError(ErrorCode.TAMPERED,
                             f"envelope was sealed for {h.type}, received at {message_type}",
                             reason="wrong_endpoint")
        if h.is_qkd:
            if self._links.qkd_link(peer) is None:
                raise KmstnError(ErrorCode.TAMPERED,
                                 f"{env.ALG_QKD} used but no QKD link joins {peer} and {me}",
                                 reason="wrong_algorithm")
            expected_sae = self._links.peer_device_sae(peer)
            if h.sae != expected_sae:
                raise KmstnError(ErrorCode.TAMPERED,
                                 f"sae {h.sae!r} is not the QKD device of {peer}",
                                 reason="wrong_sae")
        elif not self._links.has_pqc(peer) and h.type not in KEYLESS_TYPES:
            raise KmstnError(ErrorCode.TAMPERED,
                             f"{env.ALG_PQC} used but no PQC link joins {peer} and {me}",
                             reason="wrong_algorithm")
        # From here on the session is spent, whatever happens next.
        kem_secret = self._sessions.take(peer, h.session, h.kem_ciphertext)
        qkd_key = None
        if h.is_qkd:
            assert h.qkd_key_id is not None  # noqa: S101 - Header guarantees it
            qkd_key = (self._reserved.take(peer, h.qkd_key_id) if self._reserved else None)
            if qkd_key is None:
                qkd_key = fetch_qkd_key(self._links, self._devices, peer, h.qkd_key_id)
        body = env.open_envelope(sealed, combine(kem_secret, qkd_key))
        kind: HopKind = "qkd" if h.is_qkd else "pqc"
        self._log.debug("opened", extra={"peer": peer, "session": str(h.session),
                                         "kind": kind, "hop": h.hop})
        return Opened(body, h.hop, kind, h.session, h.type,
                          Deadline(h.deadline) if h.deadline is not None else None)


