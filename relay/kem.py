"""One-time ML-KEM-768 keys between neighbour relays (paper IV-B, FIPS 203).

The exchange, per message, between a sender S and the next hop R:

* **pipelined** (the default): R hands out one-time public keys in advance
  (``RelayPeer.PublicKeys``), each under a fresh session UUID, bound to the
  neighbour that asked and forgotten after ``session_ttl_s``. S keeps a
  :class:`KeyPool` of them per neighbour, encapsulates to one key per message
  and carries the KEM ciphertext in the envelope; R decapsulates once and
  forgets the private key, whether or not the envelope then opens.
* **unpipelined** (the paper's explicit exchange): S takes one public key,
  encapsulates and sends the ciphertext first (``RelayPeer.Encapsulated``);
  R decapsulates, forgets the private key and holds the *secret* under the
  session ID until one envelope uses it (or it expires).

Either way a shared secret protects at most one message: :class:`SessionStore`
removes a session the moment an envelope names it, so a replay finds nothing.

``SessionStore`` is R's side, ``KeyPool`` (relay/kempool.py) S's side; neither does any network
I/O itself (the pool is given a fetch function), so both are unit-testable.
Private keys and secrets live only in memory. Python cannot wipe them: a
forgotten key is dropped from every structure and left to the garbage
collector (see :class:`kme.types.SecretBytes`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import mlkem

from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SecretBytes

__all__ = [
    "CIPHERTEXT_BYTES",
    "MAX_KEYS_PER_REQUEST",
    "PUBLIC_KEY_BYTES",
    "SHARED_SECRET_BYTES",
    "OneTimeKey",
    "SessionStore",
    "decapsulate",
    "encapsulate",
    "generate",
    "load_public_key",
]

PUBLIC_KEY_BYTES: Final = 1184  # ML-KEM-768 encapsulation key (FIPS 203 table 3)
CIPHERTEXT_BYTES: Final = 1088
SHARED_SECRET_BYTES: Final = 32
# One PublicKeys call hands out at most this many keys.
MAX_KEYS_PER_REQUEST: Final = 256
# How many recently used session IDs a store remembers, to tell a replay
# ("already used") from a session it never issued.
_USED_MEMORY: Final = 100_000


def generate() -> mlkem.MLKEM768PrivateKey:
    return mlkem.MLKEM768PrivateKey.generate()


def load_public_key(data: bytes) -> mlkem.MLKEM768PublicKey:
    """Parse an encapsulation key; FIPS 203 7.2 type and modulus checks are the library's."""
    if len(data) != PUBLIC_KEY_BYTES:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         f"ML-KEM-768 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(data)}")
    try:
        return mlkem.MLKEM768PublicKey.from_public_bytes(data)
    except ValueError:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         "ML-KEM-768 public key is invalid (FIPS 203 7.2 checks)") from None


def encapsulate(public_key: mlkem.MLKEM768PublicKey) -> tuple[SecretBytes, bytes]:
    """Return (shared secret, ciphertext); ``cryptography`` returns them in that order."""
    secret, ciphertext = public_key.encapsulate()
    return SecretBytes(secret), ciphertext


def decapsulate(private_key: mlkem.MLKEM768PrivateKey, ciphertext: bytes) -> SecretBytes:
    """Decapsulate; a wrong-length ciphertext is INVALID_ARGUMENT.

    A well-formed but forged ciphertext gives a pseudo-random secret
    (FIPS 203 implicit rejection), which then fails the envelope's tag.
    """
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         f"ML-KEM-768 ciphertext must be {CIPHERTEXT_BYTES} bytes")
    try:
        return SecretBytes(private_key.decapsulate(ciphertext))
    except ValueError:
        raise KmstnError(ErrorCode.INVALID_ARGUMENT, "ML-KEM-768 ciphertext rejected") from None


# --------------------------------------------------------------------------
# Receiver side
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OneTimeKey:
    """A public key as handed to (and received by) a neighbour."""

    session: uuid.UUID
    public_key: bytes
    ttl_seconds: int


@dataclass(slots=True)
class _Session:
    peer: NodeId
    expires_at: float
    private_key: mlkem.MLKEM768PrivateKey | None
    secret: SecretBytes | None = None


class SessionStore:
    """The receiver's one-time sessions: issue, exchange (unpipelined), take once.

    ``max_per_peer`` bounds what one neighbour can make us hold: past it, that
    neighbour's oldest sessions are forgotten (a restarted sender asks again).
    Thread-safe.
    """

    def __init__(self, ttl_seconds: int, max_per_peer: int = 1024,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger | None = None) -> None:
        if ttl_seconds <= 0 or max_per_peer <= 0:
            raise ValueError("ttl_seconds and max_per_peer must be positive")
        self._ttl = ttl_seconds
        self._max_per_peer = max_per_peer
        self._clock = clock
        self._log = log or logging.getLogger("kmstn.relay.kem")
        self._lock = threading.Lock()
        # Insertion order is issue order, so the first entries are the oldest.
        self._sessions: collections.OrderedDict[uuid.UUID, _Session] = collections.OrderedDict()
        self._per_peer: collections.Counter[NodeId] = collections.Counter()
        self._used: collections.OrderedDict[uuid.UUID, None] = collections.OrderedDict()

    @property
    def ttl_seconds(self) -> int:
        return self._ttl

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._sessions)

    def outstanding(self, peer: NodeId) -> int:
        with self._lock:
            self._expire(self._clock())
            return self._per_peer[peer]

    def issue(self, peer: NodeId, count: int) -> list[OneTimeKey]:
        """Make ``count`` one-time key pairs for ``peer``; return their public halves."""
        if count <= 0:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "count must be at least 1")
        count = min(count, MAX_KEYS_PER_REQUEST, self._max_per_peer)
        # Key generation is the slow part; do it outside the lock.
        fresh = [(uuid.uuid4(), generate()) for _ in range(count)]
        now = self._clock()
        out: list[OneTimeKey] = []
        with self._lock:
            self._expire(now)
            for session, private_key in fresh:
                self._sessions[session] = _Session(peer, now + self._ttl, private_key)
                self._per_peer[peer] += 1
                out.append(OneTimeKey(session, private_key.public_key().public_bytes_raw(),
                                      self._ttl))
            evicted = self._evict(peer)
        if evicted:
            self._log.warning("forgot oldest one-time keys of a neighbour",
                              extra={"peer": peer, "forgotten": evicted})
        return out

    def exchange(self, peer: NodeId, session: uuid.UUID, ciphertext: bytes) -> None:
        """Unpipelined step: decapsulate now, forget the private key, hold the secret."""
        with self._lock:
            self._expire(self._clock())
            held = self._sessions.get(session)
            if held is None or held.peer != peer or held.private_key is None:
                raise self._unknown(session)
            private_key, held.private_key = held.private_key, None
        try:
            secret = decapsulate(private_key, ciphertext)
        except KmstnError:
            # The private key is already gone: a bad ciphertext burns the session.
            self._drop(session)
            raise
        with self._lock:
            if session in self._sessions:
                held.secret = secret
            else:  # expired while we were decapsulating
                raise self._unknown(session)

    def take(self, peer: NodeId, session: uuid.UUID,
             kem_ciphertext: bytes | None) -> SecretBytes:
        """Consume a session for one envelope and return its shared secret.

        The session is removed before anything else happens, so whatever the
        outcome it can never serve a second envelope. A session issued to
        another neighbour is refused without being touched.
        """
        with self._lock:
            self._expire(self._clock())
            held = self._sessions.get(session)
            if held is None or held.peer != peer:
                raise self._unknown(session)
            del self._sessions[session]
            self._per_peer[held.peer] -= 1
            self._remember_used(session)
        if held.private_key is not None:
            if kem_ciphertext is None:
                raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                                 "envelope lacks kem_ciphertext for a pipelined session",
                                 reason="bad_envelope")
            return decapsulate(held.private_key, kem_ciphertext)
        if held.secret is None:
            # Encapsulated was called but its decapsulation has not finished.
            raise self._unknown(session)
        if kem_ciphertext is not None:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             "envelope carries kem_ciphertext for a session already "
                             "exchanged with Encapsulated", reason="bad_envelope")
        return held.secret

    # -- internals (lock held) ---------------------------------------------------

    def _unknown(self, session: uuid.UUID) -> KmstnError:
        if session in self._used:
            return KmstnError(ErrorCode.UNKNOWN_SESSION, f"KEM session {session} was already used",
                              reason="session_reused")
        return KmstnError(ErrorCode.UNKNOWN_SESSION,
                          f"KEM session {session} is unknown or expired", reason="unknown_session")

    def _drop(self, session: uuid.UUID) -> None:
        with self._lock:
            held = self._sessions.pop(session, None)
            if held is not None:
                self._per_peer[held.peer] -= 1
                self._remember_used(session)

    def _remember_used(self, session: uuid.UUID) -> None:
        self._used[session] = None
        while len(self._used) > _USED_MEMORY:
            self._used.popitem(last=False)

    def _expire(self, now: float) -> None:
        # Sessions are kept in issue order and share one TTL, so expired ones
        # are always at the front.
        while self._sessions:
            session, held = next(iter(self._sessions.items()))
            if held.expires_at > now:
                break
            del self._sessions[session]
            self._per_peer[held.peer] -= 1

    def _evict(self, peer: NodeId) -> int:
        excess = self._per_peer[peer] - self._max_per_peer
        if excess <= 0:
            return 0
        victims = [s for s, h in self._sessions.items() if h.peer == peer][:excess]
        for s in victims:
            del self._sessions[s]
        self._per_peer[peer] -= len(victims)
        return len(victims)
