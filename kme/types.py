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
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, NewType, NoReturn

from kme.errors import ErrorCode, KmstnError

__all__ = [
    "Deadline",
    "DueJobs",
    "Key",
    "KeyGrant",
    "NodeId",
    "OutboxJob",
    "SaeId",
    "SecretBytes",
    "StockEntry",
    "StockId",
    "StoreOutcome",
    "VoidOutcome",
    "b64decode_strict",
    "job_kind",
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


# Outbox job kinds are short machine names chosen by the caller ("void",
# "deliver"): they appear in logs and filters, never free text.
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def job_kind(value: object) -> str:
    """Validate an outbox job kind (1-32 of a-z 0-9 _ -, a letter first)."""
    if not isinstance(value, str) or not _KIND_RE.match(value):
        shown = value if isinstance(value, str) and len(value) <= 40 else "<value>"
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         f"job kind must be 1-32 of a-z, 0-9, '_', '-' (a letter first), "
                         f"got {shown!r}")
    return value


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


@dataclass(frozen=True, slots=True)
class Deadline:
    """The one absolute deadline of a request, as it travels along the path.

    Wall-clock milliseconds since the Unix epoch, so that it means the same
    at every node (kmstn nodes keep their clocks in step with NTP). Each node
    works on a request only until its deadline and hands the next hop a
    slightly earlier one (:meth:`for_next_hop`), so a node downstream always
    gives up before the node that waits for it: nobody voids a key while a
    node further on may still be storing it, and nobody keeps working for a
    caller who has gone.
    """

    unix_ms: int

    # Kept back per hop: the time a node needs to hear a downstream failure
    # and answer its own caller before that caller's deadline.
    HOP_MARGIN_MS: ClassVar[int] = 150

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(int(time.time() * 1000 + seconds * 1000))

    @classmethod
    def from_rpc(cls, remaining: float | None, default_s: float) -> Deadline:
        """The deadline of a gRPC call (``context.time_remaining()``)."""
        if remaining is None or remaining > 10 * default_s:
            remaining = default_s
        return cls.after(remaining)

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return (self.unix_ms - time.time() * 1000) / 1000

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    def earliest(self, other: Deadline) -> Deadline:
        return self if self.unix_ms <= other.unix_ms else other

    def for_next_hop(self) -> Deadline:
        return Deadline(self.unix_ms - self.HOP_MARGIN_MS)

    def require(self, what: str) -> float:
        """Seconds left, or TIMEOUT when there is no time left for ``what``."""
        left = self.remaining()
        if left <= 0.01:
            raise KmstnError(ErrorCode.TIMEOUT, f"deadline passed before {what}")
        return left


# -- the keyvault's domain types ----------------------------------------------------
#
# One type per concept, shared by the callers (flows, relay), the keyvault
# client, its servicer and its database layer. They are converted to and
# from protobuf messages only in keyvault/convert.py (beside the servicer
# and the client).


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """One key kept in a keyvault, and who may take it.

    ``upstream_node_id`` is the neighbouring KMSTN the key arrived from over
    ETSI 020 (ext_keys or device_keys); ``None`` for a key made on this node.
    The vault records it so that only that neighbour may void the key, and
    so that a resend is recognised as the same key from the same place.
    """

    key: Key
    # The SAE that asked for the key (ETSI 014 master / ETSI 020 initiator).
    master_sae_id: str
    # At least one; each may take the key once (ETSI 014 multicast).
    allowed_sae_ids: tuple[str, ...]
    # The KMSTN where the key was first issued.
    origin_node_id: str
    upstream_node_id: str | None = None
    created_at: datetime | None = None  # None: now, filled in by the vault
    expires_at: datetime | None = None  # None: now + keyvault.key_ttl_s


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What one Store did with each key (request order within each group).

    Every key of a successful Store is in exactly one group. All three mean
    the key is (or was) in this vault exactly once, so an ETSI 020 receiver
    answers ``relayed`` for each of them.
    """

    # Written by this call.
    stored: tuple[uuid.UUID, ...]
    # Already held with the same bytes, SAEs, origin and upstream (a resend).
    already_held: tuple[uuid.UUID, ...] = ()
    # Already taken by every SAE, and this is a byte-identical resend from the
    # same upstream neighbour: accepted, not stored again, never re-deliverable.
    already_delivered: tuple[uuid.UUID, ...] = ()


@dataclass(frozen=True, slots=True)
class VoidOutcome:
    """ETSI GS QKD 020 5.2 ack statuses of one void, in request order."""

    voided: tuple[uuid.UUID, ...]
    failed_to_void: tuple[uuid.UUID, ...]
    not_present: tuple[uuid.UUID, ...]
    # Key bits discarded by this void (keys still waiting; for the metrics).
    voided_bits: int = 0


@dataclass(frozen=True, slots=True)
class OutboxJob:
    """A piece of pending work a service keeps in the keyvault's outbox.

    The caller (the relay) chooses ``job_id``, so putting the same job twice
    (a retried call) records it once. Jobs run at least once: whoever runs
    them must make each attempt idempotent. ``payload`` is opaque to the
    vault and may carry key material: it is encrypted at rest and held in a
    SecretBytes.
    """

    job_id: uuid.UUID
    # A short machine name: "void", "deliver", ...
    kind: str
    # The KMSTN the work is for.
    destination_node_id: str
    payload: SecretBytes
    # After this the job is dropped by the expiry sweep (and logged).
    expires_at: datetime
    next_due_at: datetime | None = None  # None: due at once
    attempts: int = 0  # set by the vault; reschedule adds one
    created_at: datetime | None = None  # None: now, filled in by the vault


@dataclass(frozen=True, slots=True)
class DueJobs:
    """An answer of ListDueJobs."""

    # Due now, oldest first.
    jobs: tuple[OutboxJob, ...]
    # When the next job not in ``jobs`` falls due (possibly already: more
    # were due than the limit); None when no other job is waiting.
    next_due_at: datetime | None


@dataclass(frozen=True, slots=True)
class StockId:
    """One key stock: keys relayed ahead to ``destination`` for one master and its slaves.

    The slaves are named when the stock is filled, so the destination holds
    each stocked key for exactly them, as for any relayed key.
    """

    destination: str
    master: str
    slaves: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "slaves", tuple(sorted(self.slaves)))

    def __str__(self) -> str:
        return f"{self.master}->{','.join(self.slaves)}@{self.destination}"


@dataclass(frozen=True, slots=True)
class StockEntry:
    """A stocked key as listed (no bytes)."""

    key_id: uuid.UUID
    stock: StockId
    size_bits: int
    # "pending": its fill is in flight (or was cut by a crash); "ready": held
    # at the destination too; "handed": given to the master (no bytes kept).
    state: str
    expires_at: datetime
