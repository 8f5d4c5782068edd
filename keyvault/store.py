"""The key store: an SQLCipher 4 database with take-once semantics.

Tables (all inside the encrypted file):

- ``keys``: one row per key still waiting for at least one SAE. The key
  bytes live only in ``record``, AES-256-GCM encrypted with the record's
  identity as associated data (:mod:`keyvault.records`).
- ``grants``: one row per (key, allowed SAE); ``taken_us`` is set when that
  SAE took its copy. When the last copy is taken, the key row and its grants
  are deleted in the same transaction that hands the bytes out.
- ``tombstones``: key ID, final state (taken, voided, expired), master and
  allowed set, without bytes, kept for ``tombstone_ttl_s``. They make a
  resent ETSI 020 ext_keys for a key already delivered or voided fail with
  KEY_CONFLICT instead of storing it a second time.

Concurrency: one connection, one lock. Every change runs inside
``BEGIN IMMEDIATE ... COMMIT`` while the lock is held, so two takers of the
same key are strictly ordered and exactly one of them finds it. The database
runs in WAL mode with ``synchronous = FULL``: a commit is on disk before the
caller hears about it, so an acknowledged store survives kill -9 and power
loss, and a key handed out is never handed out again after a restart.

Indexes are few on purpose: key IDs are random, so every index on a key
column is one more random page written (and encrypted) per key per commit,
which measurably costs store and take throughput. The rare questions
(Status with filters, ListPending for one SAE, void of all keys of a
master) scan instead.

Takers that name keys not yet stored may wait (concurrent delivery mode):
they sleep on a condition that every committed store signals, never poll.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import sqlcipher3

from keyvault.records import RecordCipher, RecordIdentity
from kme import metrics
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, SecretBytes

__all__ = [
    "MAX_WAIT_S",
    "SCHEMA_VERSION",
    "NewRecord",
    "RecordInfo",
    "Sweeper",
    "Vault",
    "VoidOutcome",
    "from_us",
    "to_us",
]

SCHEMA_VERSION: Final = 1
MAX_WAIT_S: Final = 60.0
_SWEEP_BATCH: Final = 1000
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US: Final = dt.timedelta(microseconds=1)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS keys (
    key_id     TEXT PRIMARY KEY,
    master     TEXT NOT NULL,
    size_bits  INTEGER NOT NULL,
    origin     TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    record     BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_by_expiry ON keys (expires_us);
CREATE INDEX IF NOT EXISTS keys_by_age ON keys (created_us, key_id);
CREATE TABLE IF NOT EXISTS grants (
    key_id   TEXT NOT NULL,
    sae      TEXT NOT NULL,
    taken_us INTEGER,
    PRIMARY KEY (key_id, sae)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (
    key_id   TEXT PRIMARY KEY,
    state    TEXT NOT NULL CHECK (state IN ('taken', 'voided', 'expired')),
    master   TEXT NOT NULL,
    allowed  TEXT NOT NULL,
    at_us    INTEGER NOT NULL,
    purge_us INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tombstones_by_purge ON tombstones (purge_us);
"""


def to_us(when: dt.datetime) -> int:
    """Microseconds since the Unix epoch (exact, no float rounding)."""
    if when.tzinfo is None:
        raise ValueError("naive datetime; use an aware UTC datetime")
    return (when - _EPOCH) // _US


def from_us(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A key to store, validated by the caller (service layer)."""

    key: Key
    master_sae_id: str
    allowed_sae_ids: tuple[str, ...]
    origin_node_id: str
    created_at: dt.datetime
    expires_at: dt.datetime

    @property
    def identity(self) -> RecordIdentity:
        return RecordIdentity(self.key.key_id, self.key.size_bits, self.master_sae_id,
                              tuple(sorted(self.allowed_sae_ids)), self.origin_node_id)


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """A waiting key without its bytes (ListPending)."""

    key_id: uuid.UUID
    size_bits: int
    master_sae_id: str
    allowed_sae_ids: tuple[str, ...]
    taken_by_sae_ids: tuple[str, ...]
    origin_node_id: str
    created_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class VoidOutcome:
    """ETSI GS QKD 020 5.2 ack statuses of one void, in request order."""

    voided: tuple[uuid.UUID, ...]
    failed_to_void: tuple[uuid.UUID, ...]
    not_present: tuple[uuid.UUID, ...]


@dataclass(frozen=True, slots=True)
class _Row:
    key_id: str
    master: str
    size_bits: int
    origin: str
    created_us: int
    expires_us: int
    record: bytes


class _NotYetError(Exception):
    """Some requested keys are absent but may still arrive (internal to take)."""

    def __init__(self, error: KmstnError) -> None:
        super().__init__(error.public)
        self.error = error


# Grants still open for keys not expired, optionally for one master / slave.
_WAITING: Final = (
    "FROM grants g JOIN keys k ON k.key_id = g.key_id "
    "WHERE g.taken_us IS NULL AND k.expires_us > ? "
    "AND (? IS NULL OR k.master = ?) AND (? IS NULL OR g.sae = ?)"
)


def _id_list(ids: Sequence[str]) -> str:
    """Key ID lists travel as one JSON array parameter (``json_each(?)``), so
    every statement is a constant string whatever the number of IDs."""
    return json.dumps(list(ids))


class Vault:
    """Take-once key storage in one SQLCipher file; safe to share between threads."""

    def __init__(self, conn: Any, cipher: RecordCipher, *, tombstone_ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._cipher = cipher
        self._tomb_ttl_us = int(tombstone_ttl_s * 1_000_000)
        self._clock = clock
        self._lock = threading.Lock()
        # Every committed store bumps the generation and wakes waiting takers.
        self._changed = threading.Condition()
        self._generation = 0
        self._closed = False
        self._listeners: list[Callable[[int], None]] = []

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, db_key: SecretBytes, cipher: RecordCipher, *,
             tombstone_ttl_s: float, clock: Callable[[], float] = time.time) -> Vault:
        """Open (or create) the database; a wrong key raises SEALED, never a traceback."""
        conn = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            # A raw 256-bit key: SQLCipher skips its passphrase KDF (about
            # 0.3 ms to open instead of about 145 ms with PBKDF2).
            conn.execute(f"PRAGMA key = \"x'{db_key.reveal().hex()}'\"")
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlcipher3.DatabaseError:
                raise KmstnError(
                    ErrorCode.SEALED,
                    f"the database key does not open {path}: the key given is not the one "
                    "this vault was created with",
                ) from None
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise KmstnError(ErrorCode.INTERNAL, f"cannot put {path} in WAL mode",
                                 cause=f"journal_mode is {mode}")
            conn.execute("PRAGMA synchronous = FULL")
            # Deleted rows (taken keys) are overwritten, not left in free pages
            # (their old page images live on in the WAL until it is reused).
            conn.execute("PRAGMA secure_delete = ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise KmstnError(ErrorCode.INTERNAL,
                                 f"{path} was written by a newer kmstn (schema {version})")
            # executescript() would commit on its own; run the schema inside
            # one explicit transaction instead.
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return cls(conn, cipher, tombstone_ttl_s=tombstone_ttl_s, clock=clock)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(sqlcipher3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()
        with self._changed:
            self._changed.notify_all()

    # -- plumbing -------------------------------------------------------------------

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        """One write transaction under the lock: commit on success, else roll back."""
        with self._lock:
            if self._closed:
                raise KmstnError(ErrorCode.UNAVAILABLE, "the key vault is shutting down")
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise KmstnError(ErrorCode.UNAVAILABLE, "the key vault is shutting down")
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @staticmethod
    def _rows(conn: Any, ids: Sequence[str]) -> dict[str, _Row]:
        cur = conn.execute(
            "SELECT key_id, master, size_bits, origin, created_us, expires_us, record "
            "FROM keys WHERE key_id IN (SELECT value FROM json_each(?))", (_id_list(ids),))
        return {r[0]: _Row(*r) for r in cur}

    @staticmethod
    def _grants(conn: Any, ids: Sequence[str]) -> dict[str, dict[str, int | None]]:
        out: dict[str, dict[str, int | None]] = {i: {} for i in ids}
        cur = conn.execute(
            "SELECT key_id, sae, taken_us FROM grants "
            "WHERE key_id IN (SELECT value FROM json_each(?))", (_id_list(ids),))
        for key_id, sae, taken in cur:
            out[key_id][sae] = taken
        return out

    @staticmethod
    def _tombstones(conn: Any, ids: Sequence[str]) -> dict[str, tuple[str, str, str]]:
        cur = conn.execute(
            "SELECT key_id, state, master, allowed FROM tombstones "
            "WHERE key_id IN (SELECT value FROM json_each(?))",
            (_id_list(ids),))
        return {r[0]: (r[1], r[2], r[3]) for r in cur}

    def _identity(self, row: _Row, allowed: Sequence[str]) -> RecordIdentity:
        return RecordIdentity(uuid.UUID(row.key_id), row.size_bits, row.master,
                              tuple(sorted(allowed)), row.origin)

    def _bury(self, conn: Any, rows: Sequence[tuple[str, str, Sequence[str]]], state: str,
              now_us: int) -> None:
        """Delete key rows and their grants, leaving tombstones (no bytes)."""
        if not rows:
            return
        ids = [r[0] for r in rows]
        conn.executemany("DELETE FROM grants WHERE key_id = ?", [(i,) for i in ids])
        conn.executemany("DELETE FROM keys WHERE key_id = ?", [(i,) for i in ids])
        conn.executemany(
            "INSERT OR REPLACE INTO tombstones (key_id, state, master, allowed, at_us, purge_us) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(i, state, master, json.dumps(sorted(allowed)), now_us, now_us + self._tomb_ttl_us)
             for i, master, allowed in rows])

    def _signal(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    # -- Store ------------------------------------------------------------------------

    def store(self, records: Sequence[NewRecord]) -> int:
        """Store a batch atomically; returns how many keys were newly written.

        A key already held with the same bytes and identity is accepted again
        (idempotent retry of an ETSI 020 ext_keys). The same ID with other
        bytes or identity, or an ID with a tombstone, raises KEY_CONFLICT and
        nothing of the batch is written.
        """
        if not records:
            return 0
        ids = [str(r.key.key_id) for r in records]
        if len(set(ids)) != len(ids):
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "a key_ID appears twice in the batch")
        # Encrypt outside the lock: it is the only CPU-heavy part of a store.
        sealed = [self._cipher.seal(r.identity, r.key.material) for r in records]
        now = self._now_us()
        with self._write() as conn:
            tombs = self._tombstones(conn, ids)
            rows = self._rows(conn, ids)
            grants = self._grants(conn, list(rows)) if rows else {}
            fresh: list[tuple[NewRecord, bytes]] = []
            for rec, blob, key_id in zip(records, sealed, ids, strict=True):
                if key_id in tombs:
                    raise _conflict(key_id, f"tombstone {tombs[key_id][0]}")
                row = rows.get(key_id)
                if row is None:
                    fresh.append((rec, blob))
                    continue
                if row.expires_us <= now:
                    raise _conflict(key_id, "expired (not swept yet)")
                held = self._identity(row, list(grants[key_id]))
                if held != rec.identity:
                    raise _conflict(key_id, "same ID, other identity")
                if self._cipher.open(held, row.record) != rec.key.material:
                    raise _conflict(key_id, "same ID, other bytes")
            conn.executemany(
                "INSERT INTO keys (key_id, master, size_bits, origin, created_us, expires_us, "
                "record) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(str(r.key.key_id), r.master_sae_id, r.key.size_bits, r.origin_node_id,
                  to_us(r.created_at), to_us(r.expires_at), blob) for r, blob in fresh])
            conn.executemany(
                "INSERT INTO grants (key_id, sae, taken_us) VALUES (?, ?, NULL)",
                [(str(r.key.key_id), sae) for r, _ in fresh for sae in r.allowed_sae_ids])
        if fresh:
            self._signal()
            soonest = min(to_us(r.expires_at) for r, _ in fresh)
            for listener in self._listeners:
                listener(soonest)
        return len(fresh)

    def on_store(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(earliest expiry in epoch us)`` after each committed store."""
        self._listeners.append(listener)

    # -- Take ---------------------------------------------------------------------------

    def take(self, sae: str, master: str, key_ids: Sequence[uuid.UUID],
             wait_s: float = 0.0, still_wanted: Callable[[], bool] | None = None) -> list[Key]:
        """Take keys for one SAE: all or nothing, each SAE at most once per key.

        With ``wait_s > 0``, keys that are simply absent (never stored, no
        tombstone) are waited for until they arrive or the wait ends; any
        other failure is immediate. Nothing is consumed on any error.

        ``still_wanted`` is asked inside the transaction, just before it
        commits: if the caller has gone (its deadline passed, it hung up) the
        take is rolled back, so a key is never deleted for an answer nobody
        will read.
        """
        ids = [str(k) for k in key_ids]
        if not ids:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "no key_IDs given")
        if len(set(ids)) != len(ids):
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "a key_ID appears twice in the request")
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while True:
            with self._changed:
                seen = self._generation
            try:
                return self._take_once(sae, master, ids, still_wanted)
            except _NotYetError as exc:
                with self._changed:
                    while self._generation == seen and not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise exc.error from None
                        self._changed.wait(left)
                if self._closed:
                    raise exc.error from None

    def _take_once(self, sae: str, master: str, ids: list[str],
                   still_wanted: Callable[[], bool] | None = None) -> list[Key]:
        now = self._now_us()
        with self._write() as conn:
            rows = self._rows(conn, ids)
            grants = self._grants(conn, ids)
            missing: list[str] = []
            waitable = True
            denied: list[str] = []
            for key_id in ids:
                row = rows.get(key_id)
                if row is None or row.master != master or row.expires_us <= now:
                    # Never say whether the ID exists for another master.
                    missing.append(key_id)
                    waitable = waitable and row is None
                elif sae not in grants[key_id]:
                    denied.append(key_id)
                elif grants[key_id][sae] is not None:
                    missing.append(key_id)  # this SAE already took its copy
                    waitable = False
            if missing:
                error = KmstnError(ErrorCode.KEY_NOT_FOUND, f"key_ID {missing[0]} not found",
                                   cause=f"{len(missing)} of {len(ids)} keys not takeable")
                # Wait only if every missing key may still arrive: never
                # stored, and no tombstone (not taken, voided or expired).
                if waitable and not denied and not self._tombstones(conn, missing):
                    raise _NotYetError(error)
                raise error
            if denied:
                raise KmstnError(ErrorCode.PERMISSION_DENIED,
                                 f"SAE {sae!r} is not allowed to take key_ID {denied[0]}")
            keys: list[Key] = []
            for key_id in ids:
                row = rows[key_id]
                material = self._cipher.open(self._identity(row, list(grants[key_id])),
                                             row.record)
                keys.append(Key(uuid.UUID(key_id), material, row.size_bits))
            # A key whose last copy this is goes away with its grants, in this
            # same transaction; the others only record who took a copy.
            done = [(key_id, rows[key_id].master, list(grants[key_id])) for key_id in ids
                    if all(t is not None for s, t in grants[key_id].items() if s != sae)]
            finished = {d[0] for d in done}
            conn.executemany("UPDATE grants SET taken_us = ? WHERE key_id = ? AND sae = ?",
                             [(now, key_id, sae) for key_id in ids if key_id not in finished])
            self._bury(conn, done, "taken", now)
            if still_wanted is not None and not still_wanted():
                raise KmstnError(ErrorCode.TIMEOUT, "the caller gave up before the keys "
                                 "were handed out; nothing was taken")
        return keys

    # -- Holds, Status, ListPending -----------------------------------------------------

    def holds(self, sae: str, master: str, key_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """The subset of ``key_ids`` this SAE could take now (nothing consumed)."""
        ids = list(dict.fromkeys(str(k) for k in key_ids))
        if not ids:
            return set()
        now = self._now_us()
        with self._read() as conn:
            cur = conn.execute(
                "SELECT k.key_id FROM keys k JOIN grants g ON g.key_id = k.key_id "
                "WHERE k.key_id IN (SELECT value FROM json_each(?)) AND k.master = ? "
                "AND k.expires_us > ? AND g.sae = ? AND g.taken_us IS NULL",
                (_id_list(ids), master, now, sae))
            return {uuid.UUID(r[0]) for r in cur}

    def status(self, master: str | None = None, slave: str | None = None
               ) -> tuple[dict[tuple[str, str], int], int]:
        """Keys each slave can still take, per (master, slave); and distinct keys."""
        args = (self._now_us(), master, master, slave, slave)
        with self._read() as conn:
            pairs = {(m, s): int(n) for m, s, n in conn.execute(
                "SELECT k.master, g.sae, count(*) " + _WAITING
                + " GROUP BY k.master, g.sae ORDER BY k.master, g.sae", args)}
            total = conn.execute("SELECT count(DISTINCT k.key_id) " + _WAITING,
                                 args).fetchone()[0]
        return pairs, int(total)

    def list_pending(self, limit: int, sae: str | None = None) -> list[RecordInfo]:
        """Keys still waiting for at least one SAE (or for ``sae``), oldest first."""
        now = self._now_us()
        with self._read() as conn:
            if sae:
                cur = conn.execute(
                    "SELECT k.key_id, k.master, k.size_bits, k.origin, k.created_us, "
                    "k.expires_us FROM keys k JOIN grants g ON g.key_id = k.key_id "
                    "WHERE g.sae = ? AND g.taken_us IS NULL AND k.expires_us > ? "
                    "ORDER BY k.created_us, k.key_id LIMIT ?", (sae, now, limit))
            else:
                cur = conn.execute(
                    "SELECT key_id, master, size_bits, origin, created_us, expires_us "
                    "FROM keys WHERE expires_us > ? ORDER BY created_us, key_id LIMIT ?",
                    (now, limit))
            rows = cur.fetchall()
            grants = self._grants(conn, [r[0] for r in rows]) if rows else {}
        out = []
        for key_id, master, size_bits, origin, created_us, expires_us in rows:
            g = grants[key_id]
            out.append(RecordInfo(
                key_id=uuid.UUID(key_id), size_bits=size_bits, master_sae_id=master,
                allowed_sae_ids=tuple(sorted(g)),
                taken_by_sae_ids=tuple(sorted(s for s, t in g.items() if t is not None)),
                origin_node_id=origin, created_at=from_us(created_us),
                expires_at=from_us(expires_us)))
        return out

    # -- Void ----------------------------------------------------------------------------

    def void(self, key_ids: Sequence[uuid.UUID], initiator: str, targets: Sequence[str],
             all_confirmation: bool = False) -> VoidOutcome:
        """Discard keys (ETSI GS QKD 020 5.3 and 6.7-6.8).

        Only keys of exactly this initiator (the master) and target set (the
        allowed SAEs) are touched; anything else is reported as not present,
        so a void reveals nothing about other SAEs' keys. A key that any SAE
        already took cannot be voided (``failed to void``) and stays for the
        SAEs that have not taken it yet. A key ID not held at all is reported
        as not present and tombstoned, so a copy still on its way is refused.
        """
        ids = list(dict.fromkeys(str(k) for k in key_ids))
        if not ids and not all_confirmation:
            raise KmstnError(
                ErrorCode.INVALID_ARGUMENT,
                "key_ids is empty: voiding every key of this SAE set needs all_confirmation",
                reason="no_all_confirmation")
        wanted = frozenset(targets)
        now = self._now_us()
        voided: list[str] = []
        failed: list[str] = []
        absent: list[str] = []
        with self._write() as conn:
            if not ids:
                # ETSI 020 6.8: every key shared by exactly these SAEs.
                ids = [r[0] for r in conn.execute(
                    "SELECT key_id FROM keys WHERE master = ? ORDER BY created_us, key_id",
                    (initiator,))]
                grants = self._grants(conn, ids) if ids else {}
                ids = [k for k in ids if frozenset(grants[k]) == wanted]
                tombs: dict[str, tuple[str, str, str]] = {}
                rows = self._rows(conn, ids) if ids else {}
            else:
                rows = self._rows(conn, ids)
                grants = self._grants(conn, ids)
                tombs = self._tombstones(conn, ids)
            bury: list[tuple[str, str, Sequence[str]]] = []
            for key_id in ids:
                row = rows.get(key_id)
                if row is not None and row.master == initiator and frozenset(
                        grants[key_id]) == wanted:
                    if any(t is not None for t in grants[key_id].values()):
                        failed.append(key_id)
                    else:
                        voided.append(key_id)
                        bury.append((key_id, row.master, list(grants[key_id])))
                    continue
                tomb = tombs.get(key_id)
                if (row is None and tomb is not None and tomb[1] == initiator
                        and frozenset(json.loads(tomb[2])) == wanted):
                    (failed if tomb[0] == "taken" else voided).append(key_id)
                    continue
                absent.append(key_id)
                if row is None and tomb is None:
                    # Voided before it arrived (the void overtook a delivery
                    # that failed on the way back): it must never be stored.
                    bury.append((key_id, initiator, sorted(wanted)))
            self._bury(conn, bury, "voided", now)
        return VoidOutcome(tuple(uuid.UUID(k) for k in voided),
                           tuple(uuid.UUID(k) for k in failed),
                           tuple(uuid.UUID(k) for k in absent))

    # -- Expiry --------------------------------------------------------------------------

    def sweep(self) -> tuple[list[uuid.UUID], int | None]:
        """Expire due keys (tombstone 'expired') and purge old tombstones.

        Returns the expired key IDs and when (epoch microseconds) the next key
        or tombstone falls due, or None when nothing is waiting.
        """
        now = self._now_us()
        expired: list[uuid.UUID] = []
        while True:
            with self._write() as conn:
                due = conn.execute(
                    "SELECT key_id, master FROM keys WHERE expires_us <= ? LIMIT ?",
                    (now, _SWEEP_BATCH)).fetchall()
                ids = [r[0] for r in due]
                grants = self._grants(conn, ids) if ids else {}
                self._bury(conn, [(k, m, list(grants[k])) for k, m in due], "expired", now)
                conn.execute("DELETE FROM tombstones WHERE purge_us <= ?", (now,))
                if len(due) < _SWEEP_BATCH:
                    nxt = conn.execute(
                        "SELECT min(t) FROM (SELECT min(expires_us) AS t FROM keys "
                        "UNION ALL SELECT min(purge_us) FROM tombstones)").fetchone()[0]
            expired += [uuid.UUID(k) for k in ids]
            if len(due) < _SWEEP_BATCH:
                return expired, (int(nxt) if nxt is not None else None)

    @property
    def closed(self) -> bool:
        return self._closed


def _conflict(key_id: str, why: str) -> KmstnError:
    return KmstnError(ErrorCode.KEY_CONFLICT,
                      f"key_ID {key_id} conflicts with a key already held, delivered or voided",
                      cause=why)


class Sweeper:
    """A background thread that expires keys when they fall due (no polling).

    It sleeps until the earliest expiry (or tombstone purge) in the database,
    and is woken early only by a store that brings a key expiring sooner.
    """

    MAX_SLEEP_S: Final = 60.0

    def __init__(self, vault: Vault, log: logging.Logger,
                 clock: Callable[[], float] = time.time) -> None:
        self._vault = vault
        self._log = log
        self._clock = clock
        self._cond = threading.Condition()
        self._wake_us: int | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="keyvault-expiry", daemon=True)
        vault.on_store(self._stored)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _stored(self, soonest_us: int) -> None:
        with self._cond:
            if self._wake_us is None or soonest_us < self._wake_us:
                self._wake_us = soonest_us
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._wake_us = None
            try:
                expired, next_us = self._vault.sweep()
            except Exception:
                if self._vault.closed:
                    return
                self._log.exception("expiry sweep failed")
                next_us = None
            if expired:
                metrics.count_keyvault_keys("expired", len(expired))
                self._log.info("keys expired", extra={
                    "count": len(expired), "key_ids": [str(k) for k in expired[:100]]})
            self._sleep(next_us)

    def _sleep(self, next_us: int | None) -> None:
        """Wait until the next due time (or a sooner store, or stop)."""
        with self._cond:
            if next_us is not None and (self._wake_us is None or next_us < self._wake_us):
                self._wake_us = next_us
            # Sweep at least once a minute even if nothing is due, so a clock
            # step cannot leave keys waiting long past their expiry.
            limit = int(self._clock() * 1_000_000) + int(self.MAX_SLEEP_S * 1_000_000)
            while not self._stopping:
                now_us = int(self._clock() * 1_000_000)
                due = min(self._wake_us, limit) if self._wake_us is not None else limit
                if due <= now_us:
                    return
                self._cond.wait((due - now_us) / 1e6 + 0.002)
