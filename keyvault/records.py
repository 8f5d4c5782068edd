"""Keys derived from the vault's root secret, and per-record encryption.

The vault has one 256-bit **root secret**, sealed by the TPM (see
:mod:`keyvault.sealing`). Independent keys are derived from it with
HKDF-SHA256 under distinct labels:

- the SQLCipher database key, which encrypts every page of the file;
- record key number 1, which encrypts each key's bytes (and each outbox
  job's payload) on its own;
- the fingerprint key, an HMAC-SHA256 key for the fingerprints that a
  tombstone keeps of a delivered key (see :meth:`RecordCipher.fingerprint`).

Keeping the two apart means neither key alone decrypts a key: whoever gets
the database key (SQLCipher keeps it in its own memory) still meets AES-GCM
records, and the record key is useless without the pages.

A stored record is ``version (1 byte) | key number (4 bytes, big endian) |
nonce (12 bytes) | AES-256-GCM ciphertext and tag``. The associated data
binds the version, the key number and the record's identity (key ID, size,
master SAE, allowed SAEs, origin node), so a record copied into another row,
or a row whose allowed set was edited, fails authentication instead of
handing its bytes to the wrong SAE.

An outbox job's payload is sealed the same way, under a different label in
the associated data and with the job's identity (job ID, kind, destination
node): a payload copied into another job's row does not decrypt.

Nonces are random (96 bits). With one record key the collision bound stays
negligible up to about 2**32 records; the key number lets a later version
rotate to a fresh record key without rewriting old rows.
"""

from __future__ import annotations

import hmac
import os
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kme.errors import ErrorCode, KmstnError
from kme.types import SecretBytes

__all__ = [
    "RECORD_VERSION",
    "ROOT_SECRET_BYTES",
    "JobIdentity",
    "RecordCipher",
    "RecordIdentity",
    "derive_db_key",
    "derive_fingerprint_key",
    "derive_record_key",
]

ROOT_SECRET_BYTES = 32
RECORD_VERSION = 1
_HEADER = struct.Struct(">BI")
_NONCE_BYTES = 12
_AAD_LABEL = b"kmstn/keyvault/record\x00"
_JOB_AAD_LABEL = b"kmstn/keyvault/job\x00"
_FINGERPRINT_LABEL = b"kmstn/keyvault/fingerprint/v1\x00"


def _hkdf(root: SecretBytes, label: bytes) -> SecretBytes:
    if len(root) != ROOT_SECRET_BYTES:
        raise ValueError(f"the root secret must be {ROOT_SECRET_BYTES} bytes")
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label)
    return SecretBytes(kdf.derive(root.reveal()))


def derive_db_key(root: SecretBytes) -> SecretBytes:
    """The SQLCipher raw key (used with ``PRAGMA key = "x'..'"``, no KDF)."""
    return _hkdf(root, b"kmstn keyvault sqlcipher key v1")


def derive_record_key(root: SecretBytes, key_number: int) -> SecretBytes:
    """The AES-256-GCM key for records written under ``key_number``."""
    return _hkdf(root, b"kmstn keyvault record key v1 #" + str(key_number).encode())


def derive_fingerprint_key(root: SecretBytes) -> SecretBytes:
    """The HMAC-SHA256 key of tombstone fingerprints."""
    return _hkdf(root, b"kmstn keyvault tombstone fingerprint key v1")


def _field(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


@dataclass(frozen=True, slots=True)
class RecordIdentity:
    """What a record is about; bound into its AEAD associated data."""

    key_id: uuid.UUID
    size_bits: int
    master_sae_id: str
    allowed_sae_ids: tuple[str, ...]
    origin_node_id: str

    @property
    def name(self) -> str:
        return f"key {self.key_id}"

    def associated_data(self, header: bytes) -> bytes:
        # Length-prefixed fields and a sorted allowed set: one identity has
        # exactly one encoding, and no two identities share one.
        allowed: Iterable[str] = sorted(self.allowed_sae_ids)
        return b"".join([
            _AAD_LABEL, header, self.key_id.bytes, struct.pack(">I", self.size_bits),
            _field(self.master_sae_id), _field(self.origin_node_id),
            struct.pack(">H", len(self.allowed_sae_ids)), *(_field(s) for s in allowed),
        ])


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """What an outbox job is; bound into its payload's associated data."""

    job_id: uuid.UUID
    kind: str
    destination_node_id: str

    @property
    def name(self) -> str:
        return f"job {self.job_id}"

    def associated_data(self, header: bytes) -> bytes:
        return b"".join([_JOB_AAD_LABEL, header, self.job_id.bytes, _field(self.kind),
                         _field(self.destination_node_id)])


class _Bound(Protocol):
    """Anything sealed by a RecordCipher: its identity goes into the AAD."""

    @property
    def name(self) -> str: ...

    def associated_data(self, header: bytes) -> bytes: ...


class RecordCipher:
    """Encrypt and decrypt key bytes per record with the current record key."""

    def __init__(self, keys: dict[int, SecretBytes], current: int,
                 fingerprint_key: SecretBytes) -> None:
        if current not in keys:
            raise ValueError("the current key number has no key")
        self._aead = {n: AESGCM(k.reveal()) for n, k in keys.items()}
        self._current = current
        self._fingerprint_key = fingerprint_key.reveal()

    @classmethod
    def from_root(cls, root: SecretBytes) -> RecordCipher:
        return cls({1: derive_record_key(root, 1)}, current=1,
                   fingerprint_key=derive_fingerprint_key(root))

    def fingerprint(self, identity: RecordIdentity, material: SecretBytes) -> bytes:
        """A keyed fingerprint of one key, kept in its tombstone after delivery.

        It lets a byte-identical resend of a delivered key be told from a
        conflicting one without keeping the key. Keyed (HMAC-SHA256 under a
        key derived from the root secret), not a plain hash: a key may be as
        short as a few bits, and even a 256-bit key may be known or guessed
        elsewhere; a plain hash in the file would let whoever reads the pages
        test guesses offline and confirm which keys this node delivered. The
        key ID, size and origin are bound in, so equal bytes under two IDs
        give unrelated fingerprints.
        """
        msg = b"".join([_FINGERPRINT_LABEL, identity.key_id.bytes,
                        struct.pack(">I", identity.size_bits), _field(identity.origin_node_id),
                        material.reveal()])
        # hmac.digest: the one-shot OpenSSL path, several times faster than
        # hmac.new() per call, which matters once per taken key.
        return hmac.digest(self._fingerprint_key, msg, "sha256")

    def seal(self, identity: _Bound, material: SecretBytes) -> bytes:
        header = _HEADER.pack(RECORD_VERSION, self._current)
        nonce = os.urandom(_NONCE_BYTES)
        ct = self._aead[self._current].encrypt(nonce, material.reveal(),
                                               identity.associated_data(header))
        return header + nonce + ct

    def open(self, identity: _Bound, blob: bytes) -> SecretBytes:
        """Decrypt one record or raise INTERNAL (the private cause says why)."""
        if len(blob) < _HEADER.size + _NONCE_BYTES + 16:
            raise _corrupt(identity, "record too short")
        version, number = _HEADER.unpack_from(blob)
        if version != RECORD_VERSION:
            raise _corrupt(identity, f"unknown record version {version}")
        aead = self._aead.get(number)
        if aead is None:
            raise _corrupt(identity, f"unknown record key number {number}")
        nonce = blob[_HEADER.size:_HEADER.size + _NONCE_BYTES]
        try:
            plain = aead.decrypt(nonce, blob[_HEADER.size + _NONCE_BYTES:],
                                 identity.associated_data(blob[:_HEADER.size]))
        except InvalidTag:
            raise _corrupt(identity, "record authentication failed") from None
        return SecretBytes(plain)


def _corrupt(identity: _Bound, why: str) -> KmstnError:
    return KmstnError(ErrorCode.INTERNAL, "stored record is damaged",
                      cause=f"{identity.name}: {why}")
