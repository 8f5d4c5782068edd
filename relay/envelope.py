"""The sealed envelope that carries one ETSI 020 message across one hop (paper IV-C).

Pure functions, no I/O. An envelope is a JSON object::

    {"v": 1, "alg": "QKD-XOR-MLKEM768/A256GCM" | "MLKEM768/A256GCM",
     "iv": b64, "ciphertext": b64, "session": uuid, "kem_ciphertext": b64,
     "qkd_key_id": uuid, "sae": str, "src": node, "dst": node, "hop": int,
     "type": "ext_keys" | "void" | "ack" | "device_keys", "deadline": int}

``qkd_key_id`` and ``sae`` appear exactly on QKD hops. ``deadline`` (Unix
time in milliseconds) is the request's one absolute deadline; the receiver
works on the message only until then, and it is authenticated like every
other header field, so no node on the way can stretch it. It is optional:
an envelope without it gets the receiver's default. ``kem_ciphertext``
appears when the receiver still holds the one-time *private* key of the
session (the pipelined exchange); it is absent when the sender delivered the
ciphertext beforehand through ``RelayPeer.Encapsulated`` (the paper's
unpipelined exchange), because then the receiver already holds the secret.

The whole ETSI 020 message is the AES-256-GCM plaintext, under a fresh random
96-bit IV, with a 128-bit tag appended to ``ciphertext``. The associated data
is the canonical encoding (sorted keys, compact JSON) of every header field
except ``iv`` and ``ciphertext``, so version, algorithm, session, KEM
ciphertext, QKD key ID, SAE, source, destination, hop, message type and deadline are
all authenticated: an envelope cannot be replayed (the session is burned on
first use), redirected (``dst`` must be the receiving node and ``src`` the
TLS-verified sender) or moved to another endpoint (``type``) unnoticed.

Parsing is strict, because the associated data is rebuilt from the parsed
values: every accepted spelling must be the one canonical spelling, or a flip
of a padding bit in base64 or of the case of a UUID letter would change the
envelope without changing what it authenticates. So unknown or duplicate
fields, wrong JSON types, non-canonical base64 or UUIDs and wrong lengths are
all rejected with ``INVALID_ARGUMENT`` and a message naming the field; a
failed tag is ``TAMPERED``.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId, SecretBytes, node_id, sae_id

__all__ = [
    "ALGORITHMS",
    "ALG_PQC",
    "ALG_QKD",
    "IV_BYTES",
    "KEM_CIPHERTEXT_BYTES",
    "KEY_BYTES",
    "MAX_ENVELOPE_BYTES",
    "MAX_HOP",
    "MESSAGE_TYPES",
    "TAG_BYTES",
    "VERSION",
    "Envelope",
    "Header",
    "associated_data",
    "open_envelope",
    "parse",
    "seal",
]

VERSION: Final = 1
ALG_QKD: Final = "QKD-XOR-MLKEM768/A256GCM"
ALG_PQC: Final = "MLKEM768/A256GCM"
ALGORITHMS: Final = (ALG_QKD, ALG_PQC)
# The ETSI 020 endpoint a message is for (relay.proto MessageType).
MESSAGE_TYPES: Final = ("ext_keys", "void", "ack", "device_keys")

IV_BYTES: Final = 12  # 96-bit GCM nonce (NIST SP 800-38D 8.2.2)
TAG_BYTES: Final = 16
KEY_BYTES: Final = 32  # AES-256
KEM_CIPHERTEXT_BYTES: Final = 1088  # ML-KEM-768 ciphertext (FIPS 203 table 3)
MAX_HOP: Final = 2**32 - 1  # relay.proto carries hop as uint32
# An ETSI 020 message with the largest key batches fits easily; anything
# bigger is refused before any parsing work is spent on it.
MAX_ENVELOPE_BYTES: Final = 4 * 1024 * 1024

_FIELDS: Final = frozenset({"v", "alg", "iv", "ciphertext", "session", "kem_ciphertext",
                            "qkd_key_id", "sae", "src", "dst", "hop", "type", "deadline"})
_REQUIRED: Final = frozenset({"v", "alg", "iv", "ciphertext", "session", "src", "dst", "hop",
                              "type"})


@dataclass(frozen=True, slots=True)
class Header:
    """Everything in an envelope except IV and ciphertext; all of it is authenticated."""

    alg: str
    session: uuid.UUID
    src: NodeId
    dst: NodeId
    hop: int
    type: str
    kem_ciphertext: bytes | None = None
    qkd_key_id: uuid.UUID | None = None
    sae: SaeId | None = None
    v: int = VERSION
    deadline: int | None = None  # Unix time, ms

    def __post_init__(self) -> None:
        _check_header(self)

    @property
    def is_qkd(self) -> bool:
        return self.alg == ALG_QKD

    def to_json_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "v": self.v, "alg": self.alg, "session": str(self.session),
            "src": self.src, "dst": self.dst, "hop": self.hop, "type": self.type,
        }
        if self.kem_ciphertext is not None:
            fields["kem_ciphertext"] = _b64(self.kem_ciphertext)
        if self.qkd_key_id is not None:
            fields["qkd_key_id"] = str(self.qkd_key_id)
        if self.sae is not None:
            fields["sae"] = self.sae
        if self.deadline is not None:
            fields["deadline"] = self.deadline
        return fields


@dataclass(frozen=True, slots=True)
class Envelope:
    header: Header
    iv: bytes
    ciphertext: bytes  # AES-GCM output: encrypted message followed by the 16-byte tag


def _bad(field: str, problem: str) -> KmstnError:
    return KmstnError(ErrorCode.INVALID_ARGUMENT, f"envelope field {field!r} {problem}",
                      reason="bad_envelope")


def _check_header(h: Header) -> None:
    if h.v != VERSION:
        raise _bad("v", f"must be {VERSION} (this relay speaks envelope version {VERSION})")
    if h.alg not in ALGORITHMS:
        raise _bad("alg", f"must be one of {', '.join(ALGORITHMS)}")
    if h.type not in MESSAGE_TYPES:
        raise _bad("type", f"must be one of {', '.join(MESSAGE_TYPES)}")
    if isinstance(h.hop, bool) or not isinstance(h.hop, int) or not 1 <= h.hop <= MAX_HOP:
        raise _bad("hop", f"must be an integer from 1 to {MAX_HOP}")
    if h.kem_ciphertext is not None and len(h.kem_ciphertext) != KEM_CIPHERTEXT_BYTES:
        raise _bad("kem_ciphertext", f"must hold {KEM_CIPHERTEXT_BYTES} bytes")
    node_id(h.src)
    node_id(h.dst)
    if h.is_qkd and (h.qkd_key_id is None or h.sae is None):
        raise _bad("qkd_key_id", f"and 'sae' are required with alg {ALG_QKD}")
    if not h.is_qkd and (h.qkd_key_id is not None or h.sae is not None):
        raise _bad("qkd_key_id", f"and 'sae' are not allowed with alg {ALG_PQC}")
    if h.sae is not None:
        sae_id(h.sae)
    if h.deadline is not None and (isinstance(h.deadline, bool) or not isinstance(
            h.deadline, int) or not 0 < h.deadline < 2**53):
        raise _bad("deadline", "must be a positive integer (Unix time in milliseconds)")


def associated_data(header: Header) -> bytes:
    """The canonical encoding of the header: sorted keys, compact, ASCII-only JSON."""
    return json.dumps(header.to_json_fields(), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def seal(header: Header, key: SecretBytes, plaintext: bytes, iv: bytes) -> bytes:
    """Encrypt ``plaintext`` under ``key`` and return the envelope as compact JSON bytes.

    ``iv`` must be fresh for every envelope (the callers pass ``os.urandom(12)``;
    tests pass fixed values to check known answers).
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"message key must be {KEY_BYTES} bytes, got {len(key)}")
    if len(iv) != IV_BYTES:
        raise ValueError(f"IV must be {IV_BYTES} bytes, got {len(iv)}")
    ciphertext = AESGCM(key.reveal()).encrypt(iv, plaintext, associated_data(header))
    fields = header.to_json_fields()
    fields["iv"] = _b64(iv)
    fields["ciphertext"] = _b64(ciphertext)
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def open_envelope(envelope: Envelope, key: SecretBytes) -> bytes:
    """Authenticate and decrypt; any change to IV, ciphertext, tag or header is TAMPERED."""
    try:
        return AESGCM(key.reveal()).decrypt(envelope.iv, envelope.ciphertext,
                                            associated_data(envelope.header))
    except InvalidTag:
        raise KmstnError(ErrorCode.TAMPERED,
                         "envelope failed authentication (IV, ciphertext, tag or header "
                         "changed, or the hop key differs)", reason="tampered") from None


# --------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _bad(key, "appears twice")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _text(doc: Mapping[str, Any], field: str) -> str:
    value = doc[field]
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    return value


def _bytes(doc: Mapping[str, Any], field: str, length: int | None = None,
           minimum: int = 0) -> bytes:
    text = _text(doc, field)
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _bad(field, "is not standard base64 (RFC 4648 section 4)") from None
    # The decoder ignores the unused bits of the last character; only the
    # canonical spelling is accepted so that no two texts decode alike.
    if _b64(data) != text:
        raise _bad(field, "is not canonical base64 (RFC 4648 section 3.5)")
    if length is not None and len(data) != length:
        raise _bad(field, f"must decode to {length} bytes, got {len(data)}")
    if len(data) < minimum:
        raise _bad(field, f"must decode to at least {minimum} bytes, got {len(data)}")
    return data


def _uuid(doc: Mapping[str, Any], field: str) -> uuid.UUID:
    text = _text(doc, field)
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        raise _bad(field, "must be a UUID") from None
    if str(parsed) != text:
        raise _bad(field, "must be a UUID in canonical lowercase form (RFC 9562)")
    return parsed


def _ident(doc: Mapping[str, Any], field: str) -> str:
    text = _text(doc, field)
    try:
        return sae_id(text) if field == "sae" else node_id(text)
    except KmstnError as exc:
        raise _bad(field, f"is not a valid identifier: {exc.public}") from None


def _deadline(doc: Mapping[str, Any]) -> int | None:
    value = doc.get("deadline")
    if "deadline" in doc and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad("deadline", "must be an integer")
    return value


def parse(data: bytes) -> Envelope:
    """Parse envelope bytes strictly; any deviation raises INVALID_ARGUMENT naming the field."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         f"envelope larger than {MAX_ENVELOPE_BYTES} bytes", reason="bad_envelope")
    try:
        text = data.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except KmstnError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise KmstnError(ErrorCode.INVALID_ARGUMENT, "envelope is not a JSON object",
                         reason="bad_envelope") from None
    if not isinstance(doc, dict):
        raise KmstnError(ErrorCode.INVALID_ARGUMENT, "envelope is not a JSON object",
                         reason="bad_envelope")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise _bad(unknown[0], "is not a known envelope field")
    missing = sorted(_REQUIRED - set(doc))
    if missing:
        raise _bad(missing[0], "is required")
    version = doc["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise _bad("v", "must be an integer")
    if version != VERSION:
        raise _bad("v", f"must be {VERSION} (this relay speaks envelope version {VERSION})")
    hop = doc["hop"]
    if isinstance(hop, bool) or not isinstance(hop, int):
        raise _bad("hop", "must be an integer")
    header = Header(
        alg=_text(doc, "alg"),
        session=_uuid(doc, "session"),
        src=NodeId(_ident(doc, "src")),
        dst=NodeId(_ident(doc, "dst")),
        hop=hop,
        type=_text(doc, "type"),
        kem_ciphertext=(_bytes(doc, "kem_ciphertext", KEM_CIPHERTEXT_BYTES)
                        if "kem_ciphertext" in doc else None),
        qkd_key_id=_uuid(doc, "qkd_key_id") if "qkd_key_id" in doc else None,
        sae=SaeId(_ident(doc, "sae")) if "sae" in doc else None,
        v=version,
        deadline=_deadline(doc),
    )
    return Envelope(header=header, iv=_bytes(doc, "iv", IV_BYTES),
                    ciphertext=_bytes(doc, "ciphertext", minimum=TAG_BYTES))
