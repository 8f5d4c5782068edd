"""The sealed envelope (relay.envelope): format, strict parsing, round trips, bit flips, XOR."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId, SecretBytes, xor_bytes
from relay import envelope as env
from relay.hopkey import combine

KEY = SecretBytes(bytes(range(32)))
IV = bytes.fromhex("000102030405060708090a0b")
SESSION = uuid.UUID("6f1c1e3a-9a53-4c55-8f0e-0d4b7d2a9e11")
QKD_ID = uuid.UUID("0c9f4a4e-2f8d-4d8b-a6a1-7e5d3c2b1a09")
KEM_CT = bytes((i * 7) % 256 for i in range(env.KEM_CIPHERTEXT_BYTES))


def header(**overrides: object) -> env.Header:
    fields: dict[str, object] = dict(alg=env.ALG_QKD, session=SESSION, src=NodeId("A"),
                                     dst=NodeId("B"), hop=2, type="ext_keys",
                                     kem_ciphertext=KEM_CT, qkd_key_id=QKD_ID,
                                     sae=SaeId("qkd-a"))
    fields.update(overrides)
    return env.Header(**fields)  # type: ignore[arg-type]


PQC = dict(alg=env.ALG_PQC, qkd_key_id=None, sae=None)


def test_wire_format_known_answer() -> None:
    """The associated data and the envelope JSON are pinned: other nodes depend on them."""
    h = header()
    aad = env.associated_data(h)
    b64ct = base64.b64encode(KEM_CT).decode()
    assert aad == (
        '{"alg":"QKD-XOR-MLKEM768/A256GCM","dst":"B","hop":2,'
        f'"kem_ciphertext":"{b64ct}",'
        '"qkd_key_id":"0c9f4a4e-2f8d-4d8b-a6a1-7e5d3c2b1a09","sae":"qkd-a",'
        '"session":"6f1c1e3a-9a53-4c55-8f0e-0d4b7d2a9e11","src":"A","type":"ext_keys","v":1}'
    ).encode()
    body = b'{"keys":[]}'
    sealed = env.seal(h, KEY, body, IV)
    doc = json.loads(sealed)
    assert set(doc) == {"v", "alg", "iv", "ciphertext", "session", "kem_ciphertext",
                        "qkd_key_id", "sae", "src", "dst", "hop", "type"}
    assert doc["iv"] == "AAECAwQFBgcICQoL"
    expected = AESGCM(KEY.reveal()).encrypt(IV, body, aad)
    assert base64.b64decode(doc["ciphertext"]) == expected
    assert len(expected) == len(body) + env.TAG_BYTES
    assert b" " not in sealed  # compact JSON: no whitespace to flip unnoticed
    parsed = env.parse(sealed)
    assert parsed.header == h and parsed.iv == IV
    assert env.open_envelope(parsed, KEY) == body


def test_pqc_envelope_has_no_qkd_fields() -> None:
    sealed = env.seal(header(**PQC), KEY, b"x", IV)
    doc = json.loads(sealed)
    assert "qkd_key_id" not in doc and "sae" not in doc and doc["alg"] == env.ALG_PQC


def test_unpipelined_envelope_has_no_kem_ciphertext() -> None:
    h = header(kem_ciphertext=None)
    doc = json.loads(env.seal(h, KEY, b"x", IV))
    assert "kem_ciphertext" not in doc
    assert env.parse(env.seal(h, KEY, b"x", IV)).header.kem_ciphertext is None


@pytest.mark.parametrize("overrides,field", [
    (dict(alg=env.ALG_QKD, qkd_key_id=None), "qkd_key_id"),
    (dict(alg=env.ALG_QKD, sae=None), "qkd_key_id"),
    (dict(alg=env.ALG_PQC), "qkd_key_id"),
    (dict(alg="AES128"), "alg"),
    (dict(hop=0), "hop"),
    (dict(hop=2**32), "hop"),
    (dict(type="keys"), "type"),
    (dict(kem_ciphertext=b"short"), "kem_ciphertext"),
    (dict(v=2), "v"),
])
def test_header_rules(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(KmstnError) as err:
        header(**overrides)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert repr(field) in err.value.public


def _mutate(sealed: bytes, **changes: object) -> bytes:
    doc = json.loads(sealed)
    for k, v in changes.items():
        if v is None:
            del doc[k]
        else:
            doc[k] = v
    return json.dumps(doc).encode()


GOOD = env.seal(header(), KEY, b"payload", IV)


@pytest.mark.parametrize("data,fragment", [
    (b"\xff\xfe", "not a JSON object"),
    (b"[]", "not a JSON object"),
    (b'{"v":1,', "not a JSON object"),
    (_mutate(GOOD, extra="x"), "'extra' is not a known envelope field"),
    (_mutate(GOOD, iv=None), "'iv' is required"),
    (_mutate(GOOD, v=True), "'v' must be an integer"),
    (_mutate(GOOD, v=1.0), "'v' must be an integer"),
    (_mutate(GOOD, v=2), "'v' must be 1"),
    (_mutate(GOOD, hop="2"), "'hop' must be an integer"),
    (_mutate(GOOD, hop=-1), "'hop' must be an integer from 1"),
    (_mutate(GOOD, iv="AAECAwQFBgcICQo="), "'iv' must decode to 12 bytes"),
    (_mutate(GOOD, iv="AAECAwQFBgcICQoL!"), "'iv' is not standard base64"),
    (_mutate(GOOD, iv="AAECAwQFBgcICQoM"[:-1] + "L\n"), "'iv' is not standard base64"),
    (_mutate(GOOD, ciphertext="AAAA"), "'ciphertext' must decode to at least 16 bytes"),
    (_mutate(GOOD, iv=7), "'iv' must be a string"),
    (_mutate(GOOD, session="6F1C1E3A-9A53-4C55-8F0E-0D4B7D2A9E11"), "canonical lowercase"),
    (_mutate(GOOD, session="{6f1c1e3a-9a53-4c55-8f0e-0d4b7d2a9e11}"), "canonical lowercase"),
    (_mutate(GOOD, session="nope"), "'session' must be a UUID"),
    (_mutate(GOOD, src="a/b"), "'src' is not a valid identifier"),
    (_mutate(GOOD, sae=""), "'sae' is not a valid identifier"),
    (b'{"v":1,"v":1}', "'v' appears twice"),
    (b'{"v":NaN}', "not a JSON object"),
    (b" " * (env.MAX_ENVELOPE_BYTES + 1), "larger than"),
])
def test_strict_parsing(data: bytes, fragment: str) -> None:
    with pytest.raises(KmstnError) as err:
        env.parse(data)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert fragment in err.value.public


def test_non_canonical_base64_padding_bits_are_rejected() -> None:
    # 1088 bytes leave two unused bits in the last base64 character; a text
    # differing only there decodes to the same bytes and must be refused.
    doc = json.loads(GOOD)
    text = doc["kem_ciphertext"]
    assert text.endswith("=") and not text.endswith("==")
    last = text[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = alphabet[alphabet.index(last) ^ 1]
    doc["kem_ciphertext"] = text[:-2] + other + "="
    assert base64.b64decode(doc["kem_ciphertext"]) == KEM_CT
    with pytest.raises(KmstnError) as err:
        env.parse(json.dumps(doc).encode())
    assert "canonical base64" in err.value.public


def test_wrong_key_or_changed_header_is_tampered() -> None:
    parsed = env.parse(GOOD)
    with pytest.raises(KmstnError) as err:
        env.open_envelope(parsed, SecretBytes(bytes(32)))
    assert err.value.code is ErrorCode.TAMPERED
    moved = env.Envelope(header(hop=3), parsed.iv, parsed.ciphertext)
    with pytest.raises(KmstnError) as err:
        env.open_envelope(moved, KEY)
    assert err.value.code is ErrorCode.TAMPERED


def _rejected(data: bytes) -> bool:
    try:
        env.open_envelope(env.parse(data), KEY)
    except KmstnError as exc:
        return exc.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.TAMPERED)
    return False


@pytest.mark.parametrize("h", [header(), header(**PQC), header(kem_ciphertext=None)],
                         ids=["qkd", "pqc", "unpipelined"])
def test_every_single_bit_flip_is_rejected(h: env.Header) -> None:
    """Exhaustive: each bit of each byte of a whole envelope, one at a time."""
    sealed = env.seal(h, KEY, b'{"keys":[{"key_ID":"x","key":"c2VjcmV0"}]}', IV)
    survivors = []
    for i in range(len(sealed)):
        for bit in range(8):
            flipped = bytearray(sealed)
            flipped[i] ^= 1 << bit
            if not _rejected(bytes(flipped)):
                survivors.append((i, bit))
    assert survivors == []
    assert not _rejected(sealed)


# -- Hypothesis ------------------------------------------------------------------------

node_ids = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~",
                   min_size=1, max_size=64)
headers = st.builds(
    lambda qkd, pipelined, src, dst, hop, typ, session, key_id, sae: env.Header(
        alg=env.ALG_QKD if qkd else env.ALG_PQC, session=session, src=NodeId(src),
        dst=NodeId(dst), hop=hop, type=typ, kem_ciphertext=KEM_CT if pipelined else None,
        qkd_key_id=key_id if qkd else None, sae=SaeId(sae) if qkd else None),
    st.booleans(), st.booleans(), node_ids, node_ids, st.integers(1, env.MAX_HOP),
    st.sampled_from(env.MESSAGE_TYPES), st.uuids(), st.uuids(), node_ids)
keys = st.binary(min_size=32, max_size=32).map(SecretBytes)


@given(h=headers, key=keys, body=st.binary(max_size=4096), iv=st.binary(min_size=12,
                                                                          max_size=12))
def test_round_trip_any_message(h: env.Header, key: SecretBytes, body: bytes,
                                iv: bytes) -> None:
    sealed = env.seal(h, key, body, iv)
    parsed = env.parse(sealed)
    assert parsed.header == h
    assert env.open_envelope(parsed, key) == body


@settings(max_examples=300)
@given(h=headers, body=st.binary(max_size=512), data=st.data())
def test_random_single_bit_flip_is_rejected(h: env.Header, body: bytes,
                                            data: st.DataObject) -> None:
    sealed = env.seal(h, KEY, body, IV)
    position = data.draw(st.integers(0, len(sealed) * 8 - 1))
    flipped = bytearray(sealed)
    flipped[position // 8] ^= 1 << (position % 8)
    assert _rejected(bytes(flipped))


@given(a=st.binary(min_size=32, max_size=32), b=st.binary(min_size=32, max_size=32))
def test_xor_combine_is_an_involution(a: bytes, b: bytes) -> None:
    qkd, kem_secret = SecretBytes(a), SecretBytes(b)
    key = combine(kem_secret, qkd)
    assert key.reveal() == xor_bytes(a, b)
    assert key.xor(kem_secret) == qkd
    assert key.xor(qkd) == kem_secret
    assert combine(kem_secret, None) == kem_secret


@given(a=st.binary(max_size=64), b=st.binary(max_size=64))
def test_xor_demands_equal_lengths(a: bytes, b: bytes) -> None:
    if len(a) == len(b):
        assert SecretBytes(a).xor(SecretBytes(b)).xor(SecretBytes(b)) == SecretBytes(a)
    else:
        with pytest.raises(ValueError, match="equal lengths"):
            SecretBytes(a).xor(SecretBytes(b))


@given(n=st.integers(0, 64).filter(lambda n: n != 32))
def test_combine_refuses_other_sizes(n: int) -> None:
    with pytest.raises(ValueError):
        combine(SecretBytes(bytes(n)), SecretBytes(bytes(32)))
    with pytest.raises(ValueError):
        combine(SecretBytes(bytes(32)), SecretBytes(bytes(n)))
