"""The message key of one hop (paper III-B.2-3, IV-A.2): QKD key XOR KEM secret, or KEM alone.

Which protection a hop gets depends only on the links the topology declares
between the two nodes, so both ends decide alike:

* Sender: if a QKD link joins us to the next hop and we have a device client
  for it, take one 256-bit key from our device (ETSI 014 ``enc_keys``) and use
  ``QKD key XOR KEM secret`` (alg ``QKD-XOR-MLKEM768/A256GCM``). If that
  device cannot deliver (unavailable, out of key, timeout) *and* a PQC link
  also joins the two nodes, fall back to the KEM secret alone
  (``MLKEM768/A256GCM``). A pair joined only by a QKD link never falls back.
* Receiver: accept ``QKD-XOR-MLKEM768`` only if a QKD link joins it to the
  sender, and ``MLKEM768`` only if a PQC link does. So a pair with only a QKD
  link cannot be downgraded to KEM-only by anyone who tampers with the
  header (the header is authenticated anyway; this is defence in depth).

On a QKD hop the envelope carries only the key ID and the SAE ID of the
sender's device; the receiver checks that SAE ID against the topology and
fetches the key by ID from its own side of the device (ETSI 014
``dec_keys``). The device decides whether it has the key: a missing key is
its KEY_NOT_FOUND.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from kme.config import Link, NodeConfig, QkdLink
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, NodeId, SaeId, SecretBytes

__all__ = [
    "FALLBACK_CODES",
    "KEYLESS_TYPES",
    "QKD_KEY_BITS",
    "DeviceClient",
    "DeviceDirectory",
    "HopLinks",
    "QkdMaterial",
    "combine",
    "fetch_qkd_key",
    "take_qkd_key",
]

QKD_KEY_BITS: Final = 256
# Device failures after which a pair with a PQC link too may go KEM-only.
FALLBACK_CODES: Final = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.INSUFFICIENT_KEY,
                                   ErrorCode.TIMEOUT})


class DeviceClient(Protocol):
    """The southbound ETSI 014 client of one QKD device (kme.qkd.QkdDeviceClient)."""

    def enc_keys(self, number: int = 1, size: int | None = None) -> list[Key]: ...

    def dec_keys(self, key_ids: Sequence[uuid.UUID]) -> list[Key]: ...


class DeviceDirectory(Protocol):
    """This node's QKD devices by neighbour (kme.qkd.QkdDevices)."""

    def toward(self, peer: NodeId) -> DeviceClient | None: ...


def combine(kem_secret: SecretBytes, qkd_key: SecretBytes | None) -> SecretBytes:
    """The hop's message key: ``qkd_key XOR kem_secret`` on a QKD hop, else the KEM secret.

    Both inputs must be 256 bits; XOR of unequal lengths raises ValueError
    (see :func:`kme.types.xor_bytes`).
    """
    if len(kem_secret) != QKD_KEY_BITS // 8:
        raise ValueError(f"KEM secret must be {QKD_KEY_BITS // 8} bytes")
    if qkd_key is None:
        return kem_secret
    return qkd_key.xor(kem_secret)


@dataclass(frozen=True, slots=True)
class QkdMaterial:
    """What the sender got from its device for one hop."""

    key: Key
    sae: SaeId


class HopLinks:
    """The topology's view of this node's kmstn neighbours and their links."""

    def __init__(self, config: NodeConfig) -> None:
        self._self = config.node_id
        self._qkd: dict[NodeId, QkdLink] = {}
        self._pqc: dict[NodeId, Link] = {}
        for link in config.topology.links_of(self._self):
            peer = link.other(self._self)
            if config.topology.kmstns[peer].kind != "kmstn":
                continue
            if isinstance(link, QkdLink):
                self._qkd[peer] = link
            elif link.kind == "pqc":
                self._pqc[peer] = link

    @property
    def node(self) -> NodeId:
        return self._self

    @property
    def neighbours(self) -> frozenset[NodeId]:
        return frozenset(self._qkd) | frozenset(self._pqc)

    def require_neighbour(self, peer: str) -> NodeId:
        if peer not in self._qkd and peer not in self._pqc:
            raise KmstnError(ErrorCode.UNKNOWN_NODE,
                             f"{peer!r} is not a kmstn neighbour of {self._self}")
        return NodeId(peer)

    def qkd_link(self, peer: NodeId) -> QkdLink | None:
        return self._qkd.get(peer)

    def has_pqc(self, peer: NodeId) -> bool:
        return peer in self._pqc

    def own_device_sae(self, peer: NodeId) -> SaeId:
        link = self._qkd[peer]
        return link.device_of(self._self).sae_id

    def peer_device_sae(self, peer: NodeId) -> SaeId:
        link = self._qkd[peer]
        return link.peer_device_of(self._self).sae_id


# Messages that carry no key material (their body holds key IDs and SAE IDs
# at most) are sealed with ML-KEM alone on every link: a QKD key would add
# nothing to what they need protected, and QKD key is the scarce resource of
# a QKD link. The message type is bound into the envelope's associated data,
# so an ext_keys can never pass as one of these.
KEYLESS_TYPES = frozenset({"void", "ack", "device_keys"})


def take_qkd_key(links: HopLinks, devices: DeviceDirectory | None,
                 peer: NodeId) -> QkdMaterial | None:
    """Sender: one 256-bit QKD key toward ``peer``, or None when the hop goes KEM-only.

    Returns None when there is no QKD link, or when the device failed in a
    way listed in FALLBACK_CODES and a PQC link exists too; otherwise a device
    failure is raised.
    """
    if links.qkd_link(peer) is None:
        return None
    client = devices.toward(peer) if devices is not None else None
    if client is None:
        if links.has_pqc(peer):
            return None
        raise KmstnError(ErrorCode.UNAVAILABLE,
                         f"no QKD device client toward {peer} for the QKD link")
    try:
        keys = client.enc_keys(1, QKD_KEY_BITS)
    except KmstnError as exc:
        if exc.code in FALLBACK_CODES and links.has_pqc(peer):
            return None
        raise
    if len(keys) != 1 or keys[0].size_bits != QKD_KEY_BITS or len(keys[0].material) != 32:
        raise KmstnError(ErrorCode.UNAVAILABLE, "QKD device returned an unexpected key",
                         cause=f"{len(keys)} keys")
    return QkdMaterial(keys[0], links.own_device_sae(peer))


def fetch_qkd_key(links: HopLinks, devices: DeviceDirectory | None, peer: NodeId,
                  key_id: uuid.UUID) -> SecretBytes:
    """Receiver: the QKD key ``key_id`` from our side of the device shared with ``peer``."""
    client = devices.toward(peer) if devices is not None else None
    if client is None:
        raise KmstnError(ErrorCode.UNAVAILABLE,
                         f"no QKD device client toward {peer} for the QKD link")
    keys = client.dec_keys([key_id])
    match = [k for k in keys if k.key_id == key_id]
    if len(match) != 1 or match[0].size_bits != QKD_KEY_BITS:
        raise KmstnError(ErrorCode.KEY_NOT_FOUND,
                         f"QKD key {key_id} is not a {QKD_KEY_BITS}-bit key of the device")
    return match[0].material
