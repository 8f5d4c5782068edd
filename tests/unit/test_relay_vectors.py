"""Known-answer tests: ML-KEM-768 (FIPS 203) and AES-256-GCM (SP 800-38D), plus interop.

Vector files and their provenance: tests/vectors/PROVENANCE.md.

``cryptography`` 50 offers ML-KEM-768 key generation from the seed ``d || z``
and decapsulation, but no deterministic encapsulation and no loading of an
expanded decapsulation key. So ``cryptography`` is held to the seed-based
KATs (public key from seed; decapsulation of valid ciphertexts and, through
implicit rejection, of invalid ones), and kyber-py -- the independent
implementation the interop tests compare against -- is held to the NIST ACVP
encapsulation and decapsulation vectors.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kyber_py.ml_kem import ML_KEM_768

from relay import kem

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def _acvp(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def _kat_records() -> list[dict[str, str]]:
    records: list[dict[str, str]] = []
    for block in (VECTORS / "mlkem768_kat.rsp").read_text().split("\n\n"):
        fields = dict(line.split(" = ", 1) for line in block.splitlines() if " = " in line)
        if fields:
            records.append(fields)
    return records


KEYGEN = _acvp("mlkem768_acvp_keygen.json")["testGroups"][0]["tests"]
ENCAP_DECAP = _acvp("mlkem768_acvp_encapdecap.json")["testGroups"]
ENCAPS = next(g for g in ENCAP_DECAP if g["function"] == "encapsulation")["tests"]
DECAPS_GROUP = next(g for g in ENCAP_DECAP if g["function"] == "decapsulation")
KAT = _kat_records()


def test_vector_files_are_the_documented_subsets() -> None:
    assert len(KEYGEN) == 10 and len(ENCAPS) == 5 and len(DECAPS_GROUP["tests"]) == 10
    assert len(KAT) == 10
    assert {t["reason"] for t in DECAPS_GROUP["tests"]} == {"no modification",
                                                            "modify ciphertext"}
    provenance = (VECTORS / "PROVENANCE.md").read_text()
    for path in sorted(VECTORS.glob("*.*")):
        if path.name == "PROVENANCE.md":
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"{digest}  {path.name}" in provenance, f"{path.name} changed or undocumented"


# -- ML-KEM-768 through cryptography ------------------------------------------------


@pytest.mark.parametrize("case", KEYGEN, ids=lambda c: f"tc{c['tcId']}")
def test_acvp_keygen_from_seed(case: dict[str, str]) -> None:
    """FIPS 203 ML-KEM.KeyGen_internal(d, z): the public key matches NIST's ek."""
    seed = bytes.fromhex(case["d"] + case["z"])
    private = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    assert private.public_key().public_bytes_raw() == bytes.fromhex(case["ek"])
    assert private.private_bytes_raw() == seed
    # The expanded key dk = dk_PKE || ek || H(ek) || z (FIPS 203 Algorithm 16).
    dk = bytes.fromhex(case["dk"])
    ek = bytes.fromhex(case["ek"])
    assert dk[1152:1152 + 1184] == ek
    assert dk[2336:2368] == hashlib.sha3_256(ek).digest()
    assert dk[2368:] == bytes.fromhex(case["z"])


@pytest.mark.parametrize("case", KAT, ids=lambda c: f"count{c['count']}")
def test_kat_keygen_and_decapsulation(case: dict[str, str]) -> None:
    private = mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(case["d"] + case["z"]))
    assert private.public_key().public_bytes_raw() == bytes.fromhex(case["pk"])
    assert private.decapsulate(bytes.fromhex(case["ct"])) == bytes.fromhex(case["ss"])
    # Implicit rejection: a corrupted ciphertext yields J(z || c), not an error.
    assert private.decapsulate(bytes.fromhex(case["ct_n"])) == bytes.fromhex(case["ss_n"])
    # And through the relay's own wrapper.
    secret = kem.decapsulate(private, bytes.fromhex(case["ct"]))
    assert secret.reveal() == bytes.fromhex(case["ss"])


def test_encapsulate_returns_secret_then_ciphertext() -> None:
    private = mlkem.MLKEM768PrivateKey.generate()
    first, second = private.public_key().encapsulate()
    assert (len(first), len(second)) == (kem.SHARED_SECRET_BYTES, kem.CIPHERTEXT_BYTES)
    assert private.decapsulate(second) == first
    secret, ciphertext = kem.encapsulate(private.public_key())
    assert kem.decapsulate(private, ciphertext) == secret


# -- ML-KEM-768 through kyber-py (the interop reference) -------------------------------


@pytest.mark.parametrize("case", ENCAPS, ids=lambda c: f"tc{c['tcId']}")
def test_acvp_encapsulation_kyber_py(case: dict[str, str]) -> None:
    k, c = ML_KEM_768._encaps_internal(bytes.fromhex(case["ek"]), bytes.fromhex(case["m"]))
    assert (k, c) == (bytes.fromhex(case["k"]), bytes.fromhex(case["c"]))


@pytest.mark.parametrize("case", DECAPS_GROUP["tests"], ids=lambda c: f"tc{c['tcId']}")
def test_acvp_decapsulation_kyber_py(case: dict[str, str]) -> None:
    dk = bytes.fromhex(DECAPS_GROUP["dk"])
    assert ML_KEM_768.decaps(dk, bytes.fromhex(case["c"])) == bytes.fromhex(case["k"])


@pytest.mark.parametrize("case", KAT[:3], ids=lambda c: f"count{c['count']}")
def test_kat_kyber_py_agrees(case: dict[str, str]) -> None:
    ek, dk = ML_KEM_768.key_derive(bytes.fromhex(case["d"] + case["z"]))
    assert ek == bytes.fromhex(case["pk"])
    k, c = ML_KEM_768._encaps_internal(ek, bytes.fromhex(case["msg"]))
    assert (k, c) == (bytes.fromhex(case["ss"]), bytes.fromhex(case["ct"]))
    assert ML_KEM_768.decaps(dk, bytes.fromhex(case["ct_n"])) == bytes.fromhex(case["ss_n"])


# -- Interop: cryptography <-> kyber-py --------------------------------------------------


@pytest.mark.parametrize("run", range(5))
def test_interop_cryptography_encapsulates_kyber_py_decapsulates(run: int) -> None:
    private = mlkem.MLKEM768PrivateKey.generate()
    ek, dk = ML_KEM_768.key_derive(private.private_bytes_raw())
    assert ek == private.public_key().public_bytes_raw()
    public = kem.load_public_key(ek)
    secret, ciphertext = kem.encapsulate(public)
    assert ML_KEM_768.decaps(dk, ciphertext) == secret.reveal()


@pytest.mark.parametrize("run", range(5))
def test_interop_kyber_py_encapsulates_cryptography_decapsulates(run: int) -> None:
    private = mlkem.MLKEM768PrivateKey.generate()
    k, c = ML_KEM_768.encaps(private.public_key().public_bytes_raw())
    assert kem.decapsulate(private, c).reveal() == k


def test_interop_with_nist_keys() -> None:
    """cryptography encapsulates to NIST's ek; kyber-py decapsulates with NIST's dk."""
    for case in KEYGEN[:3]:
        public = kem.load_public_key(bytes.fromhex(case["ek"]))
        secret, ciphertext = kem.encapsulate(public)
        assert ML_KEM_768.decaps(bytes.fromhex(case["dk"]), ciphertext) == secret.reveal()


def test_public_key_checks() -> None:
    ek = bytes.fromhex(KEYGEN[0]["ek"])
    with pytest.raises(Exception) as err:
        kem.load_public_key(ek[:-1])
    assert "1184 bytes" in str(err.value)
    # A coefficient of 0xfff >= q = 3329 fails the FIPS 203 7.2 modulus check.
    bad = b"\xff\xff" + ek[2:]
    with pytest.raises(Exception) as err:
        kem.load_public_key(bad)
    assert "invalid" in str(err.value)


# -- AES-256-GCM (NIST CAVP) ---------------------------------------------------------------


def _cavp(name: str) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    section: dict[str, str] = {}
    for block in (VECTORS / name).read_text().split("\n\n"):
        if block.startswith("["):
            section = dict(re.findall(r"\[(\w+) = (\d+)\]", block))
            continue
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if " = " in line:
                key, value = line.split(" = ", 1)
                fields[key] = value.strip()
            elif line.strip() == "FAIL":
                fields["FAIL"] = "1"
        if "Key" in fields:
            yield section, fields


ENCRYPT = list(_cavp("gcmEncryptExtIV256.rsp"))
DECRYPT = list(_cavp("gcmDecrypt256.rsp"))


def test_cavp_files_cover_lengths() -> None:
    assert len(ENCRYPT) == 75 and len(DECRYPT) == 100
    assert {s["IVlen"] for s, _ in ENCRYPT + DECRYPT} == {"96"}
    assert {s["Taglen"] for s, _ in ENCRYPT + DECRYPT} == {"128"}
    assert sum("FAIL" in f for _, f in DECRYPT) > 10
    assert len({(s["PTlen"], s["AADlen"]) for s, _ in ENCRYPT}) == 25


@pytest.mark.parametrize("section,case", ENCRYPT,
                         ids=lambda v: v.get("Count", "") if isinstance(v, dict) else "")
def test_cavp_gcm_encrypt(section: dict[str, str], case: dict[str, str]) -> None:
    out = AESGCM(bytes.fromhex(case["Key"])).encrypt(
        bytes.fromhex(case["IV"]), bytes.fromhex(case["PT"]), bytes.fromhex(case["AAD"]) or None)
    assert out == bytes.fromhex(case["CT"] + case["Tag"])


@pytest.mark.parametrize("section,case", DECRYPT,
                         ids=lambda v: v.get("Count", "") if isinstance(v, dict) else "")
def test_cavp_gcm_decrypt(section: dict[str, str], case: dict[str, str]) -> None:
    aead = AESGCM(bytes.fromhex(case["Key"]))
    args = (bytes.fromhex(case["IV"]), bytes.fromhex(case["CT"] + case["Tag"]),
            bytes.fromhex(case["AAD"]) or None)
    if "FAIL" in case:
        with pytest.raises(InvalidTag):
            aead.decrypt(*args)
    else:
        assert aead.decrypt(*args) == bytes.fromhex(case["PT"])

