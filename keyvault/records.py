"""Keys derived from the vault's root secret, and per-record encryption.

The vault has one 256-bit **root secret**, sealed by the TPM (see
:mod:`keyvault.sealing`). Two independent keys are derived from it with
HKDF-SHA256 under distinct labels:

- the SQLCipher database key, which encrypts every page of the file;
- record key number 1, which encrypts each key's bytes on its own.

Keeping the two apart means neither key alone decrypts a key: whoever gets
the database key (SQLCipher keeps it in its own memory) still meets AES-GCM
records, and the record key is useless without the pages.

A stored record is ``version (1 byte) | key number (4 bytes, big endian) |
nonce (12 bytes) | AES-256-GCM ciphertext and tag``. The associated data
binds the version, the key number and the record's identity (key ID, size,
master SAE, allowed SAEs, origin node), so a record copied into another row,
or a row whose allowed set was edited, fails authentication instead of
handing its bytes to the wrong SAE.

Nonces are random (96 bits). With one record key the collision bound stays
negligible up to about 2**32 records; the key number lets a later version
rotate to a fresh record key without rewriting old rows.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kme.errors import ErrorCode, KmstnError
from kme.types import SecretBytes

__all__ = [
    "RECORD_VERSION",
    "ROOT_SECRET_BYTES",
    "RecordCipher",
    "RecordIdentity",
    "derive_db_key",
    "derive_record_key",
]

ROOT_SECRET_BYTES = 32
RECORD_VERSION = 1
_HEADER = struct.Struct(">BI")
_NONCE_BYTES = 12
_AAD_LABEL = b"kmstn/keyvault/record\x00"


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

    def associated_data(self, header: bytes) -> bytes:
        # Length-prefixed fields and a sorted allowed set: one identity has
        # exactly one encoding, and no two identities share one.
        allowed: Iterable[str] = sorted(self.allowed_sae_ids)
        return b"".join([
            _AAD_LABEL, header, self.key_id.bytes, struct.pack(">I", self.size_bits),
            _field(self.master_sae_id), _field(self.origin_node_id),
            struct.pack(">H", len(self.allowed_sae_ids)), *(_field(s) for s in allowed),
        ])


class RecordCipher:
    """Encrypt and decrypt key bytes per record with the current record key."""

    def __init__(self, keys: dict[int, SecretBytes], current: int) -> None:
        if current not in keys:
            raise ValueError("the current key number has no key")
        self._aead = {n: AESGCM(k.reveal()) for n, k in keys.items()}
        self._current = current

    @classmethod
    def from_root(cls, root: SecretBytes) -> RecordCipher:
        return cls({1: derive_record_key(root, 1)}, current=1)

    def seal(self, identity: RecordIdentity, material: SecretBytes) -> bytes:
        header = _HEADER.pack(RECORD_VERSION, self._current)
        nonce = os.urandom(_NONCE_BYTES)
        ct = self._aead[self._current].encrypt(nonce, material.reveal(),
                                               identity.associated_data(header))
        return header + nonce + ct

    def open(self, identity: RecordIdentity, blob: bytes) -> SecretBytes:
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


def _corrupt(identity: RecordIdentity, why: str) -> KmstnError:
    return KmstnError(ErrorCode.INTERNAL, "stored key record is damaged",
                      cause=f"key {identity.key_id}: {why}")
