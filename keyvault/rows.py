"""What the vault knows about a key ID: its row, its grants, its tombstone.

Shared by the store and take paths (:mod:`keyvault.store`) and by voids
(:mod:`keyvault.voids`). Every function runs inside a transaction the
caller holds (:class:`keyvault.db.Database`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keyvault.db import id_list
from keyvault.records import RecordIdentity

__all__ = ["Burial", "Row", "Tombstone", "bury", "grants_of", "rows_of", "tombstones_of"]


@dataclass(frozen=True, slots=True)
class Row:
    """One waiting key as stored (its bytes still sealed)."""

    key_id: str
    master: str
    size_bits: int
    origin: str
    created_us: int
    expires_us: int
    record: bytes
    upstream: str  # '' for a key made on this node

    def identity(self, allowed: Sequence[str]) -> RecordIdentity:
        return RecordIdentity(uuid.UUID(self.key_id), self.size_bits, self.master,
                              tuple(sorted(allowed)), self.origin)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a key that is gone: no bytes, at most a keyed fingerprint."""

    state: str  # 'taken', 'voided' or 'expired'
    master: str
    allowed: frozenset[str]
    upstream: str
    fingerprint: bytes | None


@dataclass(frozen=True, slots=True)
class Burial:
    """A key to remove (or, for a void that overtook its key, to keep out)."""

    key_id: str
    master: str
    allowed: Sequence[str]
    upstream: str
    fingerprint: bytes | None = None


def rows_of(conn: Any, ids: Sequence[str]) -> dict[str, Row]:
    cur = conn.execute(
        "SELECT key_id, master, size_bits, origin, created_us, expires_us, record, upstream "
        "FROM keys WHERE key_id IN (SELECT value FROM json_each(?))", (id_list(ids),))
    return {r[0]: Row(*r) for r in cur}


def grants_of(conn: Any, ids: Sequence[str]) -> dict[str, dict[str, int | None]]:
    """For each ID: SAE -> when it took its copy (None: not yet)."""
    out: dict[str, dict[str, int | None]] = {i: {} for i in ids}
    cur = conn.execute(
        "SELECT key_id, sae, taken_us FROM grants "
        "WHERE key_id IN (SELECT value FROM json_each(?))", (id_list(ids),))
    for key_id, sae, taken in cur:
        out[key_id][sae] = taken
    return out


def tombstones_of(conn: Any, ids: Sequence[str]) -> dict[str, Tombstone]:
    cur = conn.execute(
        "SELECT key_id, state, master, allowed, upstream, fingerprint FROM tombstones "
        "WHERE key_id IN (SELECT value FROM json_each(?))", (id_list(ids),))
    return {r[0]: Tombstone(r[1], r[2], frozenset(json.loads(r[3])), r[4],
                            None if r[5] is None else bytes(r[5])) for r in cur}


def bury(conn: Any, burials: Sequence[Burial], state: str, now_us: int, ttl_us: int) -> None:
    """Delete key rows and their grants, leaving tombstones (no bytes)."""
    if not burials:
        return
    ids = [(b.key_id,) for b in burials]
    conn.executemany("DELETE FROM grants WHERE key_id = ?", ids)
    conn.executemany("DELETE FROM keys WHERE key_id = ?", ids)
    conn.executemany(
        "INSERT OR REPLACE INTO tombstones (key_id, state, master, allowed, at_us, purge_us, "
        "upstream, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(b.key_id, state, b.master, json.dumps(sorted(b.allowed)), now_us, now_us + ttl_us,
          b.upstream, b.fingerprint) for b in burials])
