"""Read-only questions about the keys waiting in the vault (Holds, Status, ListPending).

None of them changes anything; each runs in one read transaction of the
vault's :class:`keyvault.db.Database`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from keyvault.db import Database, from_us, id_list
from keyvault.rows import grants_of

__all__ = ["RecordInfo", "holds", "list_pending", "status"]


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
    upstream_node_id: str | None = None  # None: made on this node


# Grants still open for keys not expired, optionally for one master / slave.
_WAITING: Final = (
    "FROM grants g JOIN keys k ON k.key_id = g.key_id "
    "WHERE g.taken_us IS NULL AND k.expires_us > ? "
    "AND (? IS NULL OR k.master = ?) AND (? IS NULL OR g.sae = ?)"
)


def holds(db: Database, sae: str, master: str, key_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """The subset of ``key_ids`` this SAE could take now (nothing consumed)."""
    ids = list(dict.fromkeys(str(k) for k in key_ids))
    if not ids:
        return set()
    now = db.now_us()
    with db.read() as conn:
        cur = conn.execute(
            "SELECT k.key_id FROM keys k JOIN grants g ON g.key_id = k.key_id "
            "WHERE k.key_id IN (SELECT value FROM json_each(?)) AND k.master = ? "
            "AND k.expires_us > ? AND g.sae = ? AND g.taken_us IS NULL",
            (id_list(ids), master, now, sae))
        return {uuid.UUID(r[0]) for r in cur}


def status(db: Database, master: str | None = None, slave: str | None = None
           ) -> tuple[dict[tuple[str, str], int], int]:
    """Keys each slave can still take, per (master, slave); and distinct keys."""
    args = (db.now_us(), master, master, slave, slave)
    with db.read() as conn:
        pairs = {(m, s): int(n) for m, s, n in conn.execute(
            "SELECT k.master, g.sae, count(*) " + _WAITING
            + " GROUP BY k.master, g.sae ORDER BY k.master, g.sae", args)}
        total = conn.execute("SELECT count(DISTINCT k.key_id) " + _WAITING, args).fetchone()[0]
    return pairs, int(total)


def list_pending(db: Database, limit: int, sae: str | None = None) -> list[RecordInfo]:
    """Keys still waiting for at least one SAE (or for ``sae``), oldest first."""
    now = db.now_us()
    with db.read() as conn:
        if sae:
            cur = conn.execute(
                "SELECT k.key_id, k.master, k.size_bits, k.origin, k.created_us, "
                "k.expires_us, k.upstream FROM keys k JOIN grants g ON g.key_id = k.key_id "
                "WHERE g.sae = ? AND g.taken_us IS NULL AND k.expires_us > ? "
                "ORDER BY k.created_us, k.key_id LIMIT ?", (sae, now, limit))
        else:
            cur = conn.execute(
                "SELECT key_id, master, size_bits, origin, created_us, expires_us, upstream "
                "FROM keys WHERE expires_us > ? ORDER BY created_us, key_id LIMIT ?",
                (now, limit))
        rows = cur.fetchall()
        grants = grants_of(conn, [r[0] for r in rows]) if rows else {}
    out = []
    for key_id, master, size_bits, origin, created_us, expires_us, upstream in rows:
        g = grants[key_id]
        out.append(RecordInfo(
            key_id=uuid.UUID(key_id), size_bits=size_bits, master_sae_id=master,
            allowed_sae_ids=tuple(sorted(g)),
            taken_by_sae_ids=tuple(sorted(s for s, t in g.items() if t is not None)),
            origin_node_id=origin, created_at=from_us(created_us),
            expires_at=from_us(expires_us), upstream_node_id=upstream or None))
    return out
