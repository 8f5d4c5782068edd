"""Signed link-state records: what a node says about its own links, and proof that it said it.

A record (``kme.rpc.v1.LinkStateRecord``) is serialized once by its origin and
signed there with ML-DSA-65 (FIPS 204, ``cryptography``'s ``mldsa``) under the
context string :data:`SIGNATURE_CONTEXT`. The signed bytes travel unchanged
(:class:`Signed`), so a receiver verifies exactly what the origin signed and
never re-encodes it. The signing key is pinned to the origin by its
link-state certificate: subject CN = the node ID, subject public key
ML-DSA-65, issued by the federation's link-state CA, which every node's file
names (``[linkstate] ca``). A federation that issues these certificates from
an ML-DSA-65 CA (as ``lab.pki`` does) has no classical signature anywhere in
the chain that authenticates link state.

:meth:`Verifier.verify` checks, in this order, and raises
:class:`RecordRefusedError` naming the first check that fails:

1. the certificate parses, was issued by the pinned CA (its signature
   verified), is valid now, has an ML-DSA-65 key and a node-ID CN;
2. the signature over the record bytes;
3. the record parses, is format 1 of this federation, its origin is the
   certificate's CN, and every claim in it is well-formed.

Freshness (sequence numbers, age) needs what is already held, so it is the
database's check (``routing.lsdb``). Nothing here imports scipy or grpc.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import NameOID
from google.protobuf.message import DecodeError

from kme.acks import kind_from_proto, kind_to_proto
from kme.config import LinkKindName
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import linkstate_pb2
from kme.types import NodeId, SaeId, node_id, sae_id

__all__ = [
    "RECORD_FORMAT",
    "SIGNATURE_CONTEXT",
    "AnnouncedLink",
    "CertificateTrust",
    "ForeignNode",
    "Record",
    "RecordRefusedError",
    "Signed",
    "Signer",
    "Verified",
    "Verifier",
    "load_signer",
    "load_trust",
]

RECORD_FORMAT: Final = 1
# FIPS 204 context string: a signature made for link state cannot be taken
# for a signature over anything else signed with the same key.
SIGNATURE_CONTEXT: Final = b"kmstn/linkstate/v1"
_KINDS: Final[frozenset[str]] = frozenset({"qkd", "pqc", "site"})


class RecordRefusedError(KmstnError):
    """A record that must not be used; ``reason`` is short and names the failed check."""

    def __init__(self, reason: str, *, origin: str = "", sequence: int = 0) -> None:
        super().__init__(ErrorCode.INVALID_ARGUMENT, f"link-state record refused: {reason}",
                         reason="link_state_refused")
        self.why = reason
        self.origin = origin
        self.sequence = sequence


@dataclass(frozen=True, slots=True)
class AnnouncedLink:
    """One link as one of its ends announces it."""

    link_id: str
    neighbour: NodeId
    kind: LinkKindName
    up: bool
    cost: float
    configured_cost: float
    nominal_rate_bps: float = 0.0
    measured_rate_bps: float = 0.0
    stored_keys: int = 0
    max_keys: int = 0
    down_reason: str = ""

    def to_proto(self) -> linkstate_pb2.AnnouncedLink:
        return linkstate_pb2.AnnouncedLink(
            link_id=self.link_id, neighbour_node_id=self.neighbour,
            kind=kind_to_proto(self.kind), up=self.up, cost=self.cost,
            configured_cost=self.configured_cost, nominal_rate_bps=self.nominal_rate_bps,
            measured_rate_bps=self.measured_rate_bps, stored_keys=self.stored_keys,
            max_keys=self.max_keys, down_reason=self.down_reason)


@dataclass(frozen=True, slots=True)
class ForeignNode:
    """A foreign KMS on one of the origin's site links, and the SAEs it serves."""

    node: NodeId
    saes: tuple[SaeId, ...]


@dataclass(frozen=True, slots=True)
class Record:
    origin: NodeId
    sequence: int
    originated_ms: int
    lifetime_s: int
    federation: str
    saes: tuple[SaeId, ...]
    links: tuple[AnnouncedLink, ...]
    foreign: tuple[ForeignNode, ...] = ()

    @property
    def expires_ms(self) -> int:
        return self.originated_ms + self.lifetime_s * 1000

    def to_proto(self) -> linkstate_pb2.LinkStateRecord:
        return linkstate_pb2.LinkStateRecord(
            format=RECORD_FORMAT, federation=self.federation, origin_node_id=self.origin,
            sequence=self.sequence, originated_unix_ms=self.originated_ms,
            lifetime_seconds=self.lifetime_s, sae_ids=list(self.saes),
            links=[link.to_proto() for link in self.links],
            foreign=[linkstate_pb2.ForeignNode(node_id=f.node, sae_ids=list(f.saes))
                     for f in self.foreign])


@dataclass(frozen=True, slots=True)
class Signed:
    """A record as it travels: signed bytes, signature, the origin's certificate (DER)."""

    record: bytes
    signature: bytes
    certificate: bytes

    @property
    def digest(self) -> bytes:
        """Names these exact bytes (a verification done once holds for every copy)."""
        h = hashlib.sha256()
        for part in (self.record, self.signature, self.certificate):
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return h.digest()

    def to_proto(self) -> linkstate_pb2.SignedLinkState:
        return linkstate_pb2.SignedLinkState(record=self.record, signature=self.signature,
                                             certificate=self.certificate)

    @classmethod
    def from_proto(cls, msg: linkstate_pb2.SignedLinkState) -> Signed:
        return cls(bytes(msg.record), bytes(msg.signature), bytes(msg.certificate))

    def peek_header(self) -> tuple[str, int]:
        """Origin and sequence as the bytes claim them, unverified (for log lines only)."""
        try:
            msg = linkstate_pb2.LinkStateRecord.FromString(self.record)
        except DecodeError:
            return "", 0
        return msg.origin_node_id[:64], int(msg.sequence)


@dataclass(frozen=True, slots=True)
class Verified:
    """A record whose signature and certificate checked out."""

    record: Record
    signed: Signed
    # How it was verified, for operators ("ML-DSA-65, certificate CN=... issued by ...").
    signer: str


# -- certificates ------------------------------------------------------------------------


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return ""
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


class CertificateTrust:
    """Link-state certificates issued by one pinned CA, verified once each and remembered.

    ``clock`` returns the current time (UTC datetime): certificate validity is
    checked against it on every use, not only when first seen.
    """

    def __init__(self, ca: x509.Certificate,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._ca = ca
        self._clock = clock
        self._issuer = ca.subject.rfc4514_string()
        self._known: dict[bytes, tuple[NodeId, mldsa.MLDSA65PublicKey, x509.Certificate]] = {}
        self._lock = threading.Lock()

    def key_for(self, der: bytes) -> tuple[NodeId, mldsa.MLDSA65PublicKey, str]:
        """The node ID and ML-DSA-65 key the certificate pins (RecordRefusedError if none)."""
        fingerprint = hashlib.sha256(der).digest()
        with self._lock:
            known = self._known.get(fingerprint)
        if known is None:
            known = self._check(der)
            with self._lock:
                if len(self._known) > 100_000:  # bounded: a certificate per node, normally
                    self._known.clear()
                self._known[fingerprint] = known
        node, key, cert = known
        now = self._clock()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise RecordRefusedError(f"certificate of {node} is not valid now")
        return node, key, f"ML-DSA-65, certificate CN={node} issued by {self._issuer}"

    def _check(self, der: bytes) -> tuple[NodeId, mldsa.MLDSA65PublicKey, x509.Certificate]:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise RecordRefusedError("certificate does not parse") from None
        if cert.issuer != self._ca.subject:
            raise RecordRefusedError("certificate not issued by the link-state CA")
        try:
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise RecordRefusedError("certificate signature does not verify with the "
                                "link-state CA") from None
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is not None and basic.ca:
            raise RecordRefusedError("a CA certificate cannot sign link state")
        key = cert.public_key()
        if not isinstance(key, mldsa.MLDSA65PublicKey):
            raise RecordRefusedError("certificate key is not ML-DSA-65")
        try:
            node = node_id(_cn(cert.subject))
        except KmstnError:
            raise RecordRefusedError("certificate CN is not a node ID") from None
        return node, key, cert


def load_trust(ca_path: Path) -> CertificateTrust:
    """The pinned link-state CA, from a PEM file."""
    return CertificateTrust(x509.load_pem_x509_certificate(ca_path.read_bytes()))


# -- signing -----------------------------------------------------------------------------


class Signer:
    """This node's link-state key and certificate: signs its own records."""

    def __init__(self, key: mldsa.MLDSA65PrivateKey, certificate: x509.Certificate) -> None:
        if not isinstance(certificate.public_key(), mldsa.MLDSA65PublicKey):
            raise ValueError("the link-state certificate's key is not ML-DSA-65")
        mine = key.public_key().public_bytes_raw()
        theirs = certificate.public_key().public_bytes_raw()  # type: ignore[union-attr]
        if mine != theirs:
            raise ValueError("the link-state key does not match its certificate")
        self._key = key
        self._der = certificate.public_bytes(serialization.Encoding.DER)
        self.node = NodeId(_cn(certificate.subject))

    def sign(self, record: Record) -> Signed:
        body = record.to_proto().SerializeToString(deterministic=True)
        return Signed(body, self._key.sign(body, SIGNATURE_CONTEXT), self._der)


def load_signer(key_path: Path, cert_path: Path) -> Signer:
    """This node's signer from PEM files (PKCS#8 ML-DSA-65 key, X.509 certificate)."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    if not isinstance(key, mldsa.MLDSA65PrivateKey):
        raise ValueError(f"{key_path} is not an ML-DSA-65 private key")
    return Signer(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))


# -- verification ------------------------------------------------------------------------


class Verifier:
    """Verifies signed records for one federation; remembers what it verified.

    A verification depends only on the bytes and the pinned CA, so the result
    for one set of bytes (:attr:`Signed.digest`) is kept (bounded LRU) and a
    copy of a record that arrives again from another neighbour costs a hash,
    not an ML-DSA verification. Certificate validity is still checked on
    every call. Failures are not remembered: they raise every time.
    """

    def __init__(self, trust: CertificateTrust, federation: str, cache_size: int = 4096) -> None:
        self._trust = trust
        self._federation = federation
        self._cache: OrderedDict[bytes, Verified] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.verifications = 0  # ML-DSA verifications actually run (benchmarks)

    @property
    def federation(self) -> str:
        return self._federation

    def verify(self, signed: Signed) -> Verified:
        digest = signed.digest
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
        if hit is not None:
            self._trust.key_for(signed.certificate)  # still valid now?
            return hit
        origin, sequence = signed.peek_header()
        try:
            node, key, how = self._trust.key_for(signed.certificate)
            try:
                key.verify(signed.signature, signed.record, SIGNATURE_CONTEXT)
            except InvalidSignature:
                raise RecordRefusedError("bad signature") from None
            finally:
                self.verifications += 1
            record = self._parse(signed.record)
            if record.origin != node:
                raise RecordRefusedError(f"signed by {node}, claims origin {record.origin}")
        except RecordRefusedError as exc:
            exc.origin, exc.sequence = origin, sequence
            raise
        verified = Verified(record, signed, how)
        with self._lock:
            self._cache[digest] = verified
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return verified

    def _parse(self, body: bytes) -> Record:
        try:
            msg = linkstate_pb2.LinkStateRecord.FromString(body)
        except DecodeError:
            raise RecordRefusedError("record does not parse") from None
        if msg.format != RECORD_FORMAT:
            raise RecordRefusedError(f"unknown record format {msg.format}")
        if msg.federation != self._federation:
            raise RecordRefusedError(f"record of federation {msg.federation[:64]!r}")
        try:
            origin = node_id(msg.origin_node_id)
            saes = tuple(sae_id(s) for s in msg.sae_ids)
            links = tuple(_link(link) for link in msg.links)
            foreign = tuple(ForeignNode(node_id(f.node_id), tuple(sae_id(s) for s in f.sae_ids))
                            for f in msg.foreign)
        except (KmstnError, KeyError, ValueError):
            raise RecordRefusedError("record holds a malformed claim") from None
        if msg.lifetime_seconds < 1 or msg.sequence < 1:
            raise RecordRefusedError("record has no lifetime or sequence")
        _unique((link.link_id for link in links), "link")
        _unique((f.node for f in foreign), "foreign node")
        return Record(origin, int(msg.sequence), int(msg.originated_unix_ms),
                      int(msg.lifetime_seconds), msg.federation, saes, links, foreign)


def _link(msg: linkstate_pb2.AnnouncedLink) -> AnnouncedLink:
    kind = kind_from_proto(msg.kind)
    if kind not in _KINDS or not msg.link_id or len(msg.link_id) > 128:
        raise ValueError("bad link")
    for value in (msg.cost, msg.configured_cost):
        if not math.isfinite(value) or value <= 0:
            raise ValueError("bad cost")
    for value in (msg.nominal_rate_bps, msg.measured_rate_bps):
        if not math.isfinite(value) or value < 0:
            raise ValueError("bad rate")
    return AnnouncedLink(msg.link_id, node_id(msg.neighbour_node_id), kind, msg.up, msg.cost,
                         msg.configured_cost, msg.nominal_rate_bps, msg.measured_rate_bps,
                         int(msg.stored_keys), int(msg.max_keys), msg.down_reason[:64])


def _unique(items: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise RecordRefusedError(f"record names {what} {item!r} twice")
        seen.add(item)
