"""The outbox: pending work of another service, kept durably in the vault.

Issue 10: voids and concurrent-mode deliveries that must be retried were
held only in a gateway's memory and lost on restart. The relay records them
here instead (``jobs`` table, :mod:`keyvault.db`), in the same durable
transactions as keys (WAL, ``synchronous = FULL``), optionally in the very
transaction that stores the keys or voids them, so "the keys are here" and
"their delivery will be finished" can never be true one without the other.

A job is run at least once: a worker lists due jobs, does the work, then
completes the job (deleted) or reschedules it (attempts + 1, a new due
time). A worker that dies between the work and the completion runs it again
after a restart, so the work itself must be idempotent (ETSI 020 resends and
voids are). Expired jobs are deleted by the expiry sweep, which logs them.

Payloads may carry key material: each is sealed like a key record
(AES-256-GCM under the record key, a fresh nonce, :class:`JobIdentity` as
associated data), so a payload copied into another job's row, or a row whose
destination was edited, does not decrypt.

Every function runs inside a transaction the caller holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from keyvault.db import from_us, id_list, to_us
from keyvault.records import JobIdentity, RecordCipher
from kme.errors import ErrorCode, KmstnError
from kme.types import OutboxJob

__all__ = [
    "MAX_JOBS",
    "MAX_LEASE_S",
    "MAX_LIST_BYTES",
    "MAX_PAYLOAD_BYTES",
    "ExpiredJob",
    "SealedJobRow",
    "complete",
    "identity",
    "put",
    "reschedule",
    "select_due",
    "sweep_expired",
]

# Bounds that keep one call's work and memory small: a payload holds at most
# one ETSI 020 body (4 MiB at the gateway) and some framing.
MAX_JOBS: Final = 256
MAX_PAYLOAD_BYTES: Final = 6 * 1024 * 1024
MAX_LEASE_S: Final = 3600.0
# One ListDueJobs answer stays well under the 16 MiB gRPC message limit
# (kme.server): jobs beyond it wait for the next call (at least one is listed).
MAX_LIST_BYTES: Final = 8 * 1024 * 1024


def identity(job: OutboxJob) -> JobIdentity:
    return JobIdentity(job.job_id, job.kind, job.destination_node_id)


@dataclass(frozen=True, slots=True)
class SealedJobRow:
    """A jobs row as read, its payload still sealed."""

    job_id: str
    kind: str
    destination: str
    attempts: int
    due_us: int
    expires_us: int
    created_us: int
    payload: bytes

    def open(self, cipher: RecordCipher) -> OutboxJob:
        job_id = uuid.UUID(self.job_id)
        payload = cipher.open(JobIdentity(job_id, self.kind, self.destination), self.payload)
        return OutboxJob(job_id, self.kind, self.destination, payload,
                         expires_at=from_us(self.expires_us), next_due_at=from_us(self.due_us),
                         attempts=self.attempts, created_at=from_us(self.created_us))


@dataclass(frozen=True, slots=True)
class ExpiredJob:
    """A job the sweep dropped (for its log line; no payload)."""

    job_id: uuid.UUID
    kind: str
    destination_node_id: str
    attempts: int


_SELECT_DUE: Final = (
    "SELECT job_id, kind, destination, attempts, due_us, expires_us, created_us, payload "
    "FROM jobs WHERE due_us <= ? AND expires_us > ? AND (? IS NULL OR kind = ?) "
    "ORDER BY seq LIMIT ?")


def put(conn: Any, cipher: RecordCipher, jobs: Sequence[tuple[OutboxJob, bytes]],
        now_us: int) -> int:
    """Record sealed jobs; returns how many were new. Raises before writing anything."""
    if not jobs:
        return 0
    ids = [str(job.job_id) for job, _ in jobs]
    if len(set(ids)) != len(ids):
        raise KmstnError(ErrorCode.INVALID_ARGUMENT, "a job_id appears twice in the request")
    held = {r[0]: SealedJobRow(*r) for r in conn.execute(
        "SELECT job_id, kind, destination, attempts, due_us, expires_us, created_us, payload "
        "FROM jobs WHERE job_id IN (SELECT value FROM json_each(?))", (id_list(ids),))}
    fresh: list[tuple[OutboxJob, bytes]] = []
    for (job, blob), job_id in zip(jobs, ids, strict=True):
        old = held.get(job_id)
        if old is None:
            fresh.append((job, blob))
            continue
        # A retried put: the same job again is fine, anything else under the
        # same ID is a caller's bug that must not silently replace the work.
        same = (old.kind == job.kind and old.destination == job.destination_node_id
                and old.expires_us == to_us(job.expires_at)
                and old.open(cipher).payload == job.payload)
        if not same:
            raise KmstnError(ErrorCode.KEY_CONFLICT,
                             f"job_id {job_id} is already recorded for other work",
                             reason="job_conflict")
    last = int(conn.execute("SELECT coalesce(max(seq), 0) FROM jobs").fetchone()[0])
    conn.executemany(
        "INSERT INTO jobs (job_id, seq, kind, destination, attempts, due_us, expires_us, "
        "created_us, payload) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
        [(str(job.job_id), last + n, job.kind, job.destination_node_id,
          now_us if job.next_due_at is None else to_us(job.next_due_at),
          to_us(job.expires_at), now_us, blob) for n, (job, blob) in enumerate(fresh, 1)])
    return len(fresh)


def complete(conn: Any, job_id: uuid.UUID) -> bool:
    cur = conn.execute("DELETE FROM jobs WHERE job_id = ?", (str(job_id),))
    return bool(cur.rowcount)


def reschedule(conn: Any, job_id: uuid.UUID, due_us: int, now_us: int) -> int | None:
    """Count a failed attempt; the new attempt count, or None if the job is gone."""
    cur = conn.execute(
        "UPDATE jobs SET attempts = attempts + 1, due_us = ? WHERE job_id = ? AND expires_us > ?",
        (due_us, str(job_id), now_us))
    if not cur.rowcount:
        return None
    row = conn.execute("SELECT attempts FROM jobs WHERE job_id = ?", (str(job_id),)).fetchone()
    return int(row[0])


def select_due(conn: Any, now_us: int, limit: int, kind: str | None, lease_us: int
               ) -> tuple[list[SealedJobRow], int | None]:
    """Due, unexpired jobs (oldest first, at most MAX_LIST_BYTES of payload
    unless the first alone is larger) and the next due time of the others.

    With ``lease_us`` the returned jobs are made due again only at
    ``now + lease``, in this transaction (the caller holds a write one).
    """
    rows: list[SealedJobRow] = []
    size = 0
    for r in conn.execute(_SELECT_DUE, (now_us, now_us, kind, kind, limit)):
        row = SealedJobRow(*r)
        size += len(row.payload)
        if rows and size > MAX_LIST_BYTES:
            break
        rows.append(row)
    ids = id_list([r.job_id for r in rows])
    if lease_us and rows:
        conn.execute("UPDATE jobs SET due_us = ? WHERE job_id IN (SELECT value FROM json_each(?))",
                     (now_us + lease_us, ids))
    nxt = conn.execute(
        "SELECT min(due_us) FROM jobs WHERE expires_us > ? AND (? IS NULL OR kind = ?) "
        "AND job_id NOT IN (SELECT value FROM json_each(?))",
        (now_us, kind, kind, ids)).fetchone()[0]
    return rows, (None if nxt is None else int(nxt))


def sweep_expired(conn: Any, now_us: int, batch: int) -> list[ExpiredJob]:
    """Delete up to ``batch`` expired jobs; the ones deleted."""
    due = conn.execute(
        "SELECT job_id, kind, destination, attempts FROM jobs WHERE expires_us <= ? "
        "ORDER BY expires_us LIMIT ?", (now_us, batch)).fetchall()
    conn.executemany("DELETE FROM jobs WHERE job_id = ?", [(r[0],) for r in due])
    return [ExpiredJob(uuid.UUID(r[0]), r[1], r[2], int(r[3])) for r in due]

