"""Domain types shared by every kmstn service.

Identifiers are plain strings validated at the boundary (``sae_id``,
``node_id``) and key IDs are :class:`uuid.UUID`. Key bytes travel in
:class:`SecretBytes`, never in bare ``bytes``, so that a stray ``repr`` or log
call cannot print them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import uuid
from dataclasses import dataclass
from typing import NewType, NoReturn

from kme.errors import ErrorCode, KmstnError

__all__ = [
    "Key",
    "NodeId",
    "SaeId",
    "SecretBytes",
    "b64decode_strict",
    "node_id",
    "parse_key_id",
    "sae_id",
    "xor_bytes",
]

SaeId = NewType("SaeId", str)
NodeId = NewType("NodeId", str)

# ETSI GS QKD 020 V1.1.1 5.1: SAE IDs are 1-64 characters permitted in a URI
# (RFC 3986 unreserved, sub-delims, ":" "@" and %HH). "/", "?" and "#" are
# left out because the ID also appears as an ETSI 014 path segment.
_ID_RE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2}){1,64}$")


def _check_id(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else "<value>"
        raise KmstnError(
            ErrorCode.INVALID_ARGUMENT,
            f"{kind} must be 1-64 URI characters (no '/', '?', '#'), got {shown!r}",
        )
    return value


def sae_id(value: object) -> SaeId:
    """Validate an SAE ID (ETSI 020 5.1 rules) or raise INVALID_ARGUMENT."""
    return SaeId(_check_id("SAE ID", value))


def node_id(value: object) -> NodeId:
    """Validate a KMSTN node ID (same character rules as SAE IDs)."""
    return NodeId(_check_id("node ID", value))


def parse_key_id(value: object) -> uuid.UUID:
    """Parse a key ID in canonical RFC 9562 text form or raise INVALID_ARGUMENT.

    Only the 36-character hyphenated form is accepted (either case, as RFC
    9562 allows): ETSI 014 and 020 both carry key IDs as UUID strings, and
    braces, URNs or bare hex would give one key several spellings. The result
    is a UUID object, so every later comparison uses one canonical form.
    """
    if isinstance(value, str) and len(value) == 36:
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            pass
        else:
            if str(parsed) == value.lower():
                return parsed
    raise KmstnError(ErrorCode.INVALID_ARGUMENT, "key_ID must be a UUID string")


class SecretBytes:
    """Key material that will not print itself and compares in constant time.

    ``repr`` and ``str`` show only the length. ``==`` uses
    :func:`hmac.compare_digest`. Instances are not hashable and cannot be
    pickled, so they do not end up as dict keys or in caches by accident.

    Python cannot reliably wipe memory: the bytes object inside may be
    copied by the interpreter and lingers until garbage collection. This
    class keeps secrets out of logs and error text; it does not keep them out
    of a core dump. Services that hold keys at rest encrypt them (keyvault).
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The raw bytes, for the one place that must use them."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretBytes):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SecretBytes(<redacted {len(self._value)} bytes>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")

    def __bool__(self) -> bool:
        return bool(self._value)

    def xor(self, other: SecretBytes) -> SecretBytes:
        """Bytewise XOR with a secret of the same length (the hybrid combiner)."""
        return SecretBytes(xor_bytes(self._value, other._value))

    def b64(self) -> str:
        """Standard base64 (RFC 4648 table 1), as ETSI 014 and 020 carry keys."""
        return base64.b64encode(self._value).decode("ascii")

    @classmethod
    def from_b64(cls, text: str) -> SecretBytes:
        return cls(b64decode_strict(text))


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """XOR two byte strings of equal length; unequal lengths raise ValueError.

    Truncating or padding silently would weaken the combiner to the shorter
    input, so a length mismatch is an error, never a best effort.
    """
    if len(a) != len(b):
        raise ValueError(f"xor needs equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(n, "big")


_B64_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def b64decode_strict(text: object) -> bytes:
    """Decode standard base64 (RFC 4648 table 1) or raise INVALID_ARGUMENT.

    Only the canonical form: padding where RFC 4648 puts it and nowhere else
    (Python's decoder also takes surplus padding such as ``AAAA====``).
    """
    if not isinstance(text, str) or not _B64_RE.fullmatch(text):
        raise KmstnError(ErrorCode.INVALID_ARGUMENT, "key value must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise KmstnError(
            ErrorCode.INVALID_ARGUMENT, "key value is not valid base64 (RFC 4648)"
        ) from None


@dataclass(frozen=True, slots=True)
class Key:
    """One key: its ID, its bytes and its length in bits."""

    key_id: uuid.UUID
    material: SecretBytes
    size_bits: int

    def __post_init__(self) -> None:
        if self.size_bits <= 0 or len(self.material) != (self.size_bits + 7) // 8:
            raise ValueError(
                f"key {self.key_id}: {len(self.material)} bytes do not hold {self.size_bits} bits"
            )
