"""The vault's SQLCipher file: opening, schema and its migrations, transactions.

Tables (all inside the encrypted file):

- ``keys``: one row per key still waiting for at least one SAE. The key
  bytes live only in ``record``, AES-256-GCM encrypted with the record's
  identity as associated data (:mod:`keyvault.records`). ``upstream`` is the
  neighbour the key arrived from ('' for a key made on this node).
- ``grants``: one row per (key, allowed SAE); ``taken_us`` is set when that
  SAE took its copy. When the last copy is taken, the key row and its grants
  are deleted in the same transaction that hands the bytes out.
- ``tombstones``: key ID, final state (taken, voided, expired), master,
  allowed set and upstream, without bytes, kept for ``tombstone_ttl_s``; the
  'taken' tombstone of a key from a neighbour also keeps a keyed fingerprint
  of the value, so that a byte-identical resend can be told from a
  conflicting one
  (:mod:`keyvault.rows`, :mod:`keyvault.store`).
- ``jobs``: the outbox, pending work of another service (:mod:`keyvault.outbox`).

Concurrency: one connection, one lock. Every change runs inside
``BEGIN IMMEDIATE ... COMMIT`` while the lock is held. The database runs in
WAL mode with ``synchronous = FULL``: a commit is on disk before the caller
hears about it, so an acknowledged store (or job) survives kill -9 and power
loss, and a key handed out is never handed out again after a restart.

Indexes are few on purpose: key IDs are random, so every index on a key
column is one more random page written (and encrypted) per key per commit,
which measurably costs store and take throughput. The rare questions
(Status with filters, ListPending for one SAE, void of all keys of a
master) scan instead.

Schema versions (``PRAGMA user_version``): 1 is the first release; 2 adds
the upstream columns, the tombstone fingerprint and the outbox; 3 adds the
key stocks (issue 11). A file is
brought up to date in one transaction when it is opened, so a crash during
the migration leaves it at its old version, intact; a file written by a
newer kmstn is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import sqlcipher3

from kme.errors import ErrorCode, KmstnError
from kme.types import SecretBytes

__all__ = ["SCHEMA_VERSION", "Database", "from_us", "id_list", "to_us"]

SCHEMA_VERSION: Final = 3
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US: Final = dt.timedelta(microseconds=1)

# _MIGRATIONS[v] brings a file from version v - 1 to v. A new file runs them
# all, so a new and a migrated file have exactly the same schema.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        """CREATE TABLE keys (
            key_id     TEXT PRIMARY KEY,
            master     TEXT NOT NULL,
            size_bits  INTEGER NOT NULL,
            origin     TEXT NOT NULL,
            created_us INTEGER NOT NULL,
            expires_us INTEGER NOT NULL,
            record     BLOB NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX keys_by_expiry ON keys (expires_us)",
        "CREATE INDEX keys_by_age ON keys (created_us, key_id)",
        """CREATE TABLE grants (
            key_id   TEXT NOT NULL,
            sae      TEXT NOT NULL,
            taken_us INTEGER,
            PRIMARY KEY (key_id, sae)
        ) WITHOUT ROWID""",
        """CREATE TABLE tombstones (
            key_id   TEXT PRIMARY KEY,
            state    TEXT NOT NULL CHECK (state IN ('taken', 'voided', 'expired')),
            master   TEXT NOT NULL,
            allowed  TEXT NOT NULL,
            at_us    INTEGER NOT NULL,
            purge_us INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX tombstones_by_purge ON tombstones (purge_us)",
    ),
    2: (
        # Keys stored under version 1 get '' (no upstream): only the node
        # itself may void them, the safe side for keys of unknown provenance.
        "ALTER TABLE keys ADD COLUMN upstream TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE tombstones ADD COLUMN upstream TEXT NOT NULL DEFAULT ''",
        # HMAC-SHA256 of a delivered key (NULL for older tombstones and for
        # voided or expired keys: a resend of those is a conflict anyway).
        "ALTER TABLE tombstones ADD COLUMN fingerprint BLOB",
        # seq: the order jobs were recorded in (oldest first), also among
        # the jobs of one call, which share created_us.
        """CREATE TABLE jobs (
            job_id      TEXT PRIMARY KEY,
            seq         INTEGER NOT NULL,
            kind        TEXT NOT NULL,
            destination TEXT NOT NULL,
            attempts    INTEGER NOT NULL,
            due_us      INTEGER NOT NULL,
            expires_us  INTEGER NOT NULL,
            created_us  INTEGER NOT NULL,
            payload     BLOB NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX jobs_by_due ON jobs (due_us)",
        "CREATE INDEX jobs_by_seq ON jobs (seq)",
        "CREATE INDEX jobs_by_expiry ON jobs (expires_us)",
    ),
    3: (
        # Keys relayed ahead to a destination for one SAE pair, held here for
        # the master (keyvault.stocks). seq: fill order, oldest handed first.
        """CREATE TABLE stock (
            key_id      TEXT PRIMARY KEY,
            destination TEXT NOT NULL,
            master      TEXT NOT NULL,
            slaves      TEXT NOT NULL,
            size_bits   INTEGER NOT NULL,
            ready       INTEGER NOT NULL,
            seq         INTEGER NOT NULL,
            created_us  INTEGER NOT NULL,
            expires_us  INTEGER NOT NULL,
            record      BLOB NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX stock_by_pair ON stock (destination, master, slaves, ready, seq)",
    ),
}


def to_us(when: dt.datetime) -> int:
    """Microseconds since the Unix epoch (exact, no float rounding)."""
    if when.tzinfo is None:
        raise ValueError("naive datetime; use an aware UTC datetime")
    return (when - _EPOCH) // _US


def from_us(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


def id_list(ids: Sequence[str]) -> str:
    """ID lists travel as one JSON array parameter (``json_each(?)``), so
    every statement is a constant string whatever the number of IDs."""
    return json.dumps(list(ids))


def _connect(path: Path, db_key: SecretBytes) -> Any:
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
        # Deleted rows (taken keys, done jobs) are overwritten, not left in
        # free pages (their old page images live on in the WAL until reused).
        conn.execute("PRAGMA secure_delete = ON")
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: Any, path: Path) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise KmstnError(ErrorCode.INTERNAL,
                         f"{path} was written by a newer kmstn (schema {version})")
    if version == SCHEMA_VERSION:
        return
    # executescript() would commit on its own; run every step inside one
    # explicit transaction instead (DDL and user_version are transactional).
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Database:
    """One connection under one lock, with write and read transactions."""

    def __init__(self, conn: Any, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, path: Path, db_key: SecretBytes,
             clock: Callable[[], float] = time.time) -> Database:
        """Open (or create) and migrate; a wrong key raises SEALED, never a traceback."""
        return cls(_connect(path, db_key), clock)

    @property
    def closed(self) -> bool:
        return self._closed

    def now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(sqlcipher3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
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
    def read(self) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise KmstnError(ErrorCode.UNAVAILABLE, "the key vault is shutting down")
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
