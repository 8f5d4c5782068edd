"""Domain types: SecretBytes never shows itself, XOR is strict, IDs are validated."""

from __future__ import annotations

import pickle
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kme.errors import ErrorCode, KmstnError
from kme.types import Key, SecretBytes, node_id, parse_key_id, sae_id, xor_bytes

CANARY = bytes.fromhex("c0ffee00deadbeef" * 4)


def test_secret_bytes_is_redacted_everywhere() -> None:
    s = SecretBytes(CANARY)
    for text in (repr(s), str(s), f"{s}", "%s" % (s,), repr([s]), repr({"k": s})):  # noqa: UP031
        assert CANARY.hex() not in text
        assert "c0ffee" not in text
        assert "redacted 32 bytes" in text


def test_secret_bytes_compare_and_refuse_hash_and_pickle() -> None:
    assert SecretBytes(b"abc") == SecretBytes(b"abc")
    assert SecretBytes(b"abc") != SecretBytes(b"abd")
    assert SecretBytes(b"abc") != b"abc"  # never equal to bare bytes
    with pytest.raises(TypeError):
        hash(SecretBytes(b"abc"))
    with pytest.raises(TypeError):
        pickle.dumps(SecretBytes(b"abc"))


@given(st.binary(max_size=64), st.data())
def test_xor_is_an_involution(a: bytes, data: st.DataObject) -> None:
    b = data.draw(st.binary(min_size=len(a), max_size=len(a)))
    assert xor_bytes(xor_bytes(a, b), b) == a
    assert SecretBytes(a).xor(SecretBytes(b)).xor(SecretBytes(b)) == SecretBytes(a)


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_xor_demands_equal_lengths(a: bytes, b: bytes) -> None:
    if len(a) == len(b):
        assert len(xor_bytes(a, b)) == len(a)
    else:
        with pytest.raises(ValueError, match="equal lengths"):
            xor_bytes(a, b)


def test_key_ids_are_canonical_uuids() -> None:
    k = uuid.uuid4()
    assert parse_key_id(str(k)) == k
    assert parse_key_id(str(k).upper()) == k  # RFC 9562: input is case-insensitive
    for bad in ("non-uuid", "{" + str(k) + "}", k.hex, 42, None, ""):
        with pytest.raises(KmstnError) as err:
            parse_key_id(bad)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("good", ["SAE1", "encryptor-2", "a.b_c~d", "x" * 64, "%41b", "a:b@c"])
def test_valid_ids(good: str) -> None:
    assert sae_id(good) == good
    assert node_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 65, "a/b", "a b", "a?b", "é", "%4", 7, None])
def test_invalid_ids(bad: object) -> None:
    with pytest.raises(KmstnError) as err:
        sae_id(bad)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_key_checks_its_length() -> None:
    Key(uuid.uuid4(), SecretBytes(bytes(32)), 256)
    Key(uuid.uuid4(), SecretBytes(bytes(3)), 17)  # 17 bits need 3 bytes
    with pytest.raises(ValueError, match="do not hold"):
        Key(uuid.uuid4(), SecretBytes(bytes(31)), 256)
