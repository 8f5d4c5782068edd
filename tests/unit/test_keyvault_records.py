"""Per-record AES-256-GCM: format, identity binding, and key separation."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from keyvault.records import (
    RECORD_VERSION,
    RecordCipher,
    RecordIdentity,
    derive_db_key,
    derive_record_key,
)
from kme.errors import ErrorCode, KmstnError
from kme.types import SecretBytes

ROOT = SecretBytes(bytes(range(32)))
IDENTITY = RecordIdentity(uuid.UUID("8a3f2c51-1c2e-4a5f-9b0d-2f6c7e8d9a01"), 256, "sae-m",
                          ("sae-s", "sae-t"), "A")


def test_round_trip_and_layout() -> None:
    cipher = RecordCipher.from_root(ROOT)
    material = SecretBytes(b"\x42" * 32)
    blob = cipher.seal(IDENTITY, material)
    assert blob[0] == RECORD_VERSION
    assert blob[1:5] == (1).to_bytes(4, "big")  # key number
    assert len(blob) == 1 + 4 + 12 + 32 + 16
    assert material.reveal() not in blob
    assert cipher.open(IDENTITY, blob) == material
    # Fresh nonce per record: the same key twice gives two different records.
    assert cipher.seal(IDENTITY, material) != blob


def test_record_is_plain_aes_gcm_under_the_derived_key() -> None:
    """An independent decryption with the spec'd layout and the HKDF key."""
    cipher = RecordCipher.from_root(ROOT)
    blob = cipher.seal(IDENTITY, SecretBytes(b"k" * 32))
    aead = AESGCM(derive_record_key(ROOT, 1).reveal())
    plain = aead.decrypt(blob[5:17], blob[17:], IDENTITY.associated_data(blob[:5]))
    assert plain == b"k" * 32


@pytest.mark.parametrize("change", [
    {"key_id": uuid.UUID("8a3f2c51-1c2e-4a5f-9b0d-2f6c7e8d9a02")},
    {"size_bits": 255},
    {"master_sae_id": "sae-x"},
    {"allowed_sae_ids": ("sae-s",)},
    {"allowed_sae_ids": ("sae-s", "sae-t", "sae-u")},
    {"origin_node_id": "B"},
])
def test_a_record_moved_to_another_identity_does_not_open(change: dict[str, object]) -> None:
    cipher = RecordCipher.from_root(ROOT)
    blob = cipher.seal(IDENTITY, SecretBytes(b"\x01" * 32))
    with pytest.raises(KmstnError) as err:
        cipher.open(dataclasses.replace(IDENTITY, **change), blob)  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.INTERNAL
    assert "authentication failed" in (err.value.cause or "")


def test_allowed_set_order_does_not_matter() -> None:
    cipher = RecordCipher.from_root(ROOT)
    blob = cipher.seal(IDENTITY, SecretBytes(b"\x01" * 32))
    swapped = dataclasses.replace(IDENTITY, allowed_sae_ids=("sae-t", "sae-s"))
    assert cipher.open(swapped, blob) == SecretBytes(b"\x01" * 32)


def test_length_prefixes_keep_identities_apart() -> None:
    a = RecordIdentity(IDENTITY.key_id, 256, "ab", ("c",), "A")
    b = RecordIdentity(IDENTITY.key_id, 256, "a", ("bc",), "A")
    assert a.associated_data(b"h") != b.associated_data(b"h")


@pytest.mark.parametrize("mutate", [
    lambda b: bytes([2]) + b[1:],  # unknown version
    lambda b: b[:1] + (7).to_bytes(4, "big") + b[5:],  # unknown key number
    lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # tag
    lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],  # ciphertext
    lambda b: b[:10],  # truncated
])
def test_tampered_records_fail(mutate: object) -> None:
    cipher = RecordCipher.from_root(ROOT)
    blob = cipher.seal(IDENTITY, SecretBytes(b"\x01" * 32))
    with pytest.raises(KmstnError):
        cipher.open(IDENTITY, mutate(blob))  # type: ignore[operator]


def test_other_root_does_not_open() -> None:
    blob = RecordCipher.from_root(ROOT).seal(IDENTITY, SecretBytes(b"\x01" * 32))
    with pytest.raises(KmstnError):
        RecordCipher.from_root(SecretBytes(bytes(32))).open(IDENTITY, blob)


def test_database_and_record_keys_are_separate_and_stable() -> None:
    db, rec1, rec2 = derive_db_key(ROOT), derive_record_key(ROOT, 1), derive_record_key(ROOT, 2)
    assert len({db.reveal(), rec1.reveal(), rec2.reveal(), ROOT.reveal()}) == 4
    assert derive_db_key(SecretBytes(bytes(range(32)))) == db
    with pytest.raises(ValueError):
        derive_db_key(SecretBytes(b"short"))


@given(st.binary(min_size=1, max_size=512), st.lists(st.text(min_size=1, max_size=8),
                                                     min_size=1, max_size=4, unique=True))
def test_round_trip_any_bytes_and_allowed_set(material: bytes, allowed: list[str]) -> None:
    cipher = RecordCipher.from_root(ROOT)
    ident = dataclasses.replace(IDENTITY, allowed_sae_ids=tuple(allowed),
                                size_bits=len(material) * 8)
    assert cipher.open(ident, cipher.seal(ident, SecretBytes(material))) == SecretBytes(material)
