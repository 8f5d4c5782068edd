"""The key store: take-once keys, voids and the outbox over one SQLCipher file.

The file, its schema and its transactions are :mod:`keyvault.db`; what is
known about a key ID (row, grants, tombstone) is :mod:`keyvault.rows`;
voids are :mod:`keyvault.voids`; the outbox is :mod:`keyvault.outbox`; the
expiry thread is :mod:`keyvault.sweeper`. This module holds the
:class:`Vault` that puts them together, and the store and take paths.

Every change runs in one ``BEGIN IMMEDIATE ... COMMIT`` under one lock, so
two takers of the same key are strictly ordered and exactly one of them
finds it; a commit is durable before the caller hears of it.

Store rules (ETSI 020 ext_keys may be resent after a lost answer, issue 16):

- a new key ID is stored;
- a key already held with the same bytes, master, allowed SAEs, origin and
  upstream is **already held** (not written again);
- a key that arrived from a neighbour and was taken by every SAE, resent
  byte-identical from the same neighbour for the same master and SAEs, is
  **already delivered**: accepted, not stored again, never deliverable
  again. The tombstone keeps a keyed fingerprint of the value for this
  comparison (:meth:`keyvault.records.RecordCipher.fingerprint`). A key
  made on this node has no upstream and cannot be resent: storing a
  delivered one again is a conflict (a device that repeated a key ID);
- everything else under a known ID (other bytes or metadata, a voided or
  expired key) is KEY_CONFLICT, and nothing of the batch is written.

Takers that name keys not yet stored may wait (concurrent delivery mode):
they sleep on a condition that every committed store signals, never poll.
"""

from __future__ import annotations

import datetime as dt
import hmac
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from keyvault import outbox, queries, stocks
from keyvault.db import SCHEMA_VERSION, Database, from_us, to_us
from keyvault.queries import RecordInfo
from keyvault.records import RecordCipher, RecordIdentity
from keyvault.rows import Burial, Row, Tombstone, bury, grants_of, rows_of, tombstones_of
from keyvault.sweeper import Sweeper, Swept, expire
from keyvault.voids import void as _void
from kme.errors import ErrorCode, KmstnError
from kme.types import (
    DueJobs,
    Key,
    KeyGrant,
    OutboxJob,
    SecretBytes,
    StockEntry,
    StockId,
    StoreOutcome,
    VoidOutcome,
)

__all__ = [
    "MAX_WAIT_S",
    "SCHEMA_VERSION",
    "RecordInfo",
    "Sweeper",
    "Swept",
    "Vault",
    "VoidOutcome",
    "from_us",
    "to_us",
]

MAX_WAIT_S: Final = 60.0


class _NotYetError(Exception):
    """Some requested keys are absent but may still arrive (internal to take)."""

    def __init__(self, error: KmstnError) -> None:
        super().__init__(error.public)
        self.error = error


def _identity(grant: KeyGrant) -> RecordIdentity:
    return RecordIdentity(grant.key.key_id, grant.key.size_bits, grant.master_sae_id,
                          tuple(sorted(grant.allowed_sae_ids)), grant.origin_node_id)


def _conflict(key_id: str, why: str) -> KmstnError:
    return KmstnError(ErrorCode.KEY_CONFLICT,
                      f"key_ID {key_id} conflicts with a key already held, delivered or voided",
                      cause=why)


class Vault:
    """Take-once key storage and an outbox in one SQLCipher file; thread-safe."""

    def __init__(self, db: Database, cipher: RecordCipher, *, tombstone_ttl_s: float) -> None:
        self._db = db
        self._cipher = cipher
        self._tomb_ttl_us = int(tombstone_ttl_s * 1_000_000)
        # Every committed store bumps the generation and wakes waiting takers.
        self._changed = threading.Condition()
        self._generation = 0
        self._listeners: list[Callable[[int], None]] = []

    @classmethod
    def open(cls, path: Path, db_key: SecretBytes, cipher: RecordCipher, *,
             tombstone_ttl_s: float, clock: Callable[[], float] = time.time) -> Vault:
        """Open (or create, or migrate) the database; a wrong key raises SEALED."""
        return cls(Database.open(path, db_key, clock), cipher, tombstone_ttl_s=tombstone_ttl_s)

    def close(self) -> None:
        self._db.close()
        with self._changed:
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._db.closed

    def on_store(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(earliest expiry in epoch us)`` after each commit that
        adds keys or jobs (the expiry thread sleeps until the earliest one)."""
        self._listeners.append(listener)

    def _committed(self, key_expiries: Sequence[int], job_expiries: Sequence[int]) -> None:
        if key_expiries:
            with self._changed:
                self._generation += 1
                self._changed.notify_all()
        if key_expiries or job_expiries:
            soonest = min([*key_expiries, *job_expiries])
            for listener in self._listeners:
                listener(soonest)

    def _seal_jobs(self, jobs: Sequence[OutboxJob]) -> list[tuple[OutboxJob, bytes]]:
        return [(j, self._cipher.seal(outbox.identity(j), j.payload)) for j in jobs]

    # -- Store ------------------------------------------------------------------------

    def store(self, grants: Sequence[KeyGrant]) -> int:
        """Store a batch atomically; how many keys were newly written (see store_keys)."""
        return len(self.store_keys(grants).stored)

    def store_keys(self, grants: Sequence[KeyGrant], jobs: Sequence[OutboxJob] = ()
                   ) -> StoreOutcome:
        """Store a batch and record ``jobs`` in one transaction (module rules).

        Every grant must have ``expires_at`` (the service fills in defaults);
        ``created_at`` defaults to now. On any error nothing is written.
        """
        ids = [str(g.key.key_id) for g in grants]
        if len(set(ids)) != len(ids):
            raise KmstnError(ErrorCode.INVALID_ARGUMENT, "a key_ID appears twice in the batch")
        now = self._db.now_us()
        times = [(now if g.created_at is None else to_us(g.created_at), self._expiry(g))
                 for g in grants]
        # Encrypt outside the lock: it is the only CPU-heavy part of a store.
        sealed = [self._cipher.seal(_identity(g), g.key.material) for g in grants]
        sealed_jobs = self._seal_jobs(jobs)
        with self._db.write() as conn:
            tombs = tombstones_of(conn, ids)
            rows = rows_of(conn, ids)
            held_grants = grants_of(conn, list(rows)) if rows else {}
            fresh: list[int] = []
            held: list[uuid.UUID] = []
            delivered: list[uuid.UUID] = []
            for i, (grant, key_id) in enumerate(zip(grants, ids, strict=True)):
                tomb = tombs.get(key_id)
                row = rows.get(key_id)
                if tomb is not None:
                    if not self._delivered_resend(tomb, grant):
                        raise _conflict(key_id, f"tombstone {tomb.state}")
                    delivered.append(grant.key.key_id)
                elif row is None:
                    fresh.append(i)
                else:
                    self._check_held(row, held_grants[key_id], grant, now)
                    held.append(grant.key.key_id)
            conn.executemany(
                "INSERT INTO keys (key_id, master, size_bits, origin, created_us, expires_us, "
                "record, upstream) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(ids[i], grants[i].master_sae_id, grants[i].key.size_bits,
                  grants[i].origin_node_id, times[i][0], times[i][1], sealed[i],
                  grants[i].upstream_node_id or "") for i in fresh])
            conn.executemany(
                "INSERT INTO grants (key_id, sae, taken_us) VALUES (?, ?, NULL)",
                [(ids[i], sae) for i in fresh for sae in grants[i].allowed_sae_ids])
            outbox.put(conn, self._cipher, sealed_jobs, now)
        self._committed([times[i][1] for i in fresh], [to_us(j.expires_at) for j in jobs])
        return StoreOutcome(tuple(grants[i].key.key_id for i in fresh), tuple(held),
                            tuple(delivered))

    @staticmethod
    def _expiry(grant: KeyGrant) -> int:
        if grant.expires_at is None:
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             f"key_ID {grant.key.key_id}: expires_at is required")
        return to_us(grant.expires_at)

    def _check_held(self, row: Row, allowed: dict[str, int | None], grant: KeyGrant,
                    now_us: int) -> None:
        """Raise KEY_CONFLICT unless ``grant`` is exactly the key held in ``row``."""
        if row.expires_us <= now_us:
            raise _conflict(row.key_id, "expired (not swept yet)")
        held = row.identity(list(allowed))
        if held != _identity(grant):
            raise _conflict(row.key_id, "same ID, other identity")
        if row.upstream != (grant.upstream_node_id or ""):
            raise _conflict(row.key_id, "same ID, other upstream")
        if self._cipher.open(held, row.record) != grant.key.material:
            raise _conflict(row.key_id, "same ID, other bytes")

    def _delivered_resend(self, tomb: Tombstone, grant: KeyGrant) -> bool:
        """Is ``grant`` a byte-identical resend of the delivered key in ``tomb``?"""
        upstream = grant.upstream_node_id or ""
        if (tomb.state != "taken" or not upstream or tomb.fingerprint is None
                or tomb.upstream != upstream or tomb.master != grant.master_sae_id
                or tomb.allowed != frozenset(grant.allowed_sae_ids)):
            return False
        mine = self._cipher.fingerprint(_identity(grant), grant.key.material)
        return hmac.compare_digest(mine, tomb.fingerprint)

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
                    while self._generation == seen and not self.closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise exc.error from None
                        self._changed.wait(left)
                if self.closed:
                    raise exc.error from None

    def _take_once(self, sae: str, master: str, ids: list[str],
                   still_wanted: Callable[[], bool] | None = None) -> list[Key]:
        now = self._db.now_us()
        with self._db.write() as conn:
            rows = rows_of(conn, ids)
            grants = grants_of(conn, ids)
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
                if waitable and not denied and not tombstones_of(conn, missing):
                    raise _NotYetError(error)
                raise error
            if denied:
                raise KmstnError(ErrorCode.PERMISSION_DENIED,
                                 f"SAE {sae!r} is not allowed to take key_ID {denied[0]}")
            keys: list[Key] = []
            done: list[Burial] = []
            for key_id in ids:
                row = rows[key_id]
                identity = row.identity(list(grants[key_id]))
                material = self._cipher.open(identity, row.record)
                keys.append(Key(uuid.UUID(key_id), material, row.size_bits))
                # A key whose last copy this is goes away with its grants, in
                # this same transaction; the others only record who took a copy.
                if all(t is not None for s, t in grants[key_id].items() if s != sae):
                    # Only a key from a neighbour can be resent: only its
                    # tombstone needs the fingerprint that recognises it.
                    fingerprint = (self._cipher.fingerprint(identity, material)
                                   if row.upstream else None)
                    done.append(Burial(key_id, row.master, list(grants[key_id]), row.upstream,
                                       fingerprint))
            finished = {d.key_id for d in done}
            conn.executemany("UPDATE grants SET taken_us = ? WHERE key_id = ? AND sae = ?",
                             [(now, key_id, sae) for key_id in ids if key_id not in finished])
            bury(conn, done, "taken", now, self._tomb_ttl_us)
            if still_wanted is not None and not still_wanted():
                raise KmstnError(ErrorCode.TIMEOUT, "the caller gave up before the keys "
                                 "were handed out; nothing was taken")
        return keys

    # -- Holds, Status, ListPending (read-only: keyvault.queries) -------------------------

    def holds(self, sae: str, master: str, key_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """The subset of ``key_ids`` this SAE could take now (nothing consumed)."""
        return queries.holds(self._db, sae, master, key_ids)

    def status(self, master: str | None = None, slave: str | None = None
               ) -> tuple[dict[tuple[str, str], int], int]:
        """Keys each slave can still take, per (master, slave); and distinct keys."""
        return queries.status(self._db, master, slave)

    def list_pending(self, limit: int, sae: str | None = None) -> list[RecordInfo]:
        """Keys still waiting for at least one SAE (or for ``sae``), oldest first."""
        return queries.list_pending(self._db, limit, sae)

    # -- Void ----------------------------------------------------------------------------

    def void(self, key_ids: Sequence[uuid.UUID], initiator: str, targets: Sequence[str],
             all_confirmation: bool = False, *, upstream: str | None = None,
             jobs: Sequence[OutboxJob] = ()) -> VoidOutcome:
        """Discard keys (:mod:`keyvault.voids`), and record ``jobs`` in the same
        transaction. ``upstream``: the neighbour asking, None for the node itself."""
        sealed_jobs = self._seal_jobs(jobs)
        now = self._db.now_us()
        with self._db.write() as conn:
            outcome = _void(conn, [str(k) for k in key_ids], initiator, targets,
                            all_confirmation, upstream, now, self._tomb_ttl_us)
            outbox.put(conn, self._cipher, sealed_jobs, now)
        self._committed([], [to_us(j.expires_at) for j in jobs])
        return outcome

    # -- Outbox --------------------------------------------------------------------------

    def put_jobs(self, jobs: Sequence[OutboxJob]) -> int:
        """Record jobs atomically; how many were new (identical repeats are fine)."""
        sealed_jobs = self._seal_jobs(jobs)
        with self._db.write() as conn:
            recorded = outbox.put(conn, self._cipher, sealed_jobs, self._db.now_us())
        self._committed([], [to_us(j.expires_at) for j in jobs])
        return recorded

    def complete_job(self, job_id: uuid.UUID) -> bool:
        """Delete a job whose work is done; False if it was gone already."""
        with self._db.write() as conn:
            return outbox.complete(conn, job_id)

    def reschedule_job(self, job_id: uuid.UUID, next_due_at: dt.datetime) -> int | None:
        """Count a failed attempt and set the next due time; None if the job is gone."""
        now = self._db.now_us()
        with self._db.write() as conn:
            return outbox.reschedule(conn, job_id, to_us(next_due_at), now)

    def due_jobs(self, limit: int, kind: str | None = None, lease_s: float = 0.0) -> DueJobs:
        """Jobs due now and not expired, oldest first (see outbox.select_due)."""
        now = self._db.now_us()
        lease_us = int(min(max(lease_s, 0.0), outbox.MAX_LEASE_S) * 1_000_000)
        with (self._db.write() if lease_us else self._db.read()) as conn:
            rows, nxt = outbox.select_due(conn, now, limit, kind, lease_us)
        # Decrypt outside the lock: payloads may be large.
        return DueJobs(tuple(r.open(self._cipher) for r in rows),
                       None if nxt is None else from_us(nxt))

    # -- Stocks (keyvault.stocks) ---------------------------------------------------------

    def stock_put(self, stock: StockId, keys: Sequence[Key], expires_at: dt.datetime) -> int:
        """Record a fill's keys as pending, before the fill leaves this node."""
        with self._db.write() as conn:
            return stocks.put(conn, self._cipher, stock, keys, self._db.now_us(),
                              to_us(expires_at))

    def stock_settle(self, key_ids: Sequence[uuid.UUID], ready: bool) -> int:
        with self._db.write() as conn:
            return stocks.settle(conn, key_ids, ready)

    def stock_take(self, stock: StockId, number: int, size_bits: int) -> list[Key]:
        with self._db.write() as conn:
            return stocks.take(conn, self._cipher, stock, number, size_bits,
                               self._db.now_us())

    def stock_list(self, limit: int = 0, states: Sequence[str] = ()) -> list[StockEntry]:
        with self._db.read() as conn:
            return stocks.list_entries(conn, limit, states)

    # -- Expiry --------------------------------------------------------------------------

    def sweep(self) -> tuple[list[uuid.UUID], int | None]:
        """Expire due keys and jobs, purge old tombstones (see expire)."""
        swept = self.expire()
        return swept.keys, swept.next_us

    def expire(self) -> Swept:
        """Expire due keys (tombstone 'expired'), delete expired jobs, purge old
        tombstones; and say when the next key, job or tombstone falls due."""
        return expire(self._db, self._tomb_ttl_us)
