"""Voids (ETSI GS QKD 020 5.3, 6.7-6.8), and who may ask for them.

Only keys of exactly the void's initiator (the master) and target set (the
allowed SAEs) are touched; anything else is reported as not present, so a
void reveals nothing about other SAEs' keys. A key that any SAE already took
cannot be voided (``failed to void``) and stays for the SAEs that have not
taken it yet. A key ID not held at all is reported as not present and
tombstoned, so a copy still on its way is refused.

A void on behalf of a neighbour (``upstream`` given: ETSI 020 from that
KMSTN) may touch only keys that arrived from it (issue 16: any neighbour
could void any key). If it names a key of this initiator and target set
that arrived from another neighbour, or was made on this node, the whole
void is refused with PERMISSION_DENIED before anything changes; a void of
all keys (ETSI 020 6.8) considers only that neighbour's keys. The check is
made only for keys of the void's own initiator and target set, so that a
refusal tells a neighbour nothing about other SAEs' keys: those stay "not
present", as for any void. The node's own voids (no upstream) are not
restricted.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from keyvault.rows import Burial, Row, Tombstone, bury, grants_of, rows_of, tombstones_of
from kme.errors import ErrorCode, KmstnError
from kme.types import VoidOutcome

__all__ = ["void"]


def void(conn: Any, key_ids: Sequence[str], initiator: str, targets: Sequence[str],
         all_confirmation: bool, upstream: str | None, now_us: int, ttl_us: int
         ) -> VoidOutcome:
    """Run one void inside the caller's write transaction."""
    ids = list(dict.fromkeys(key_ids))
    if not ids and not all_confirmation:
        raise KmstnError(
            ErrorCode.INVALID_ARGUMENT,
            "key_ids is empty: voiding every key of this SAE set needs all_confirmation",
            reason="no_all_confirmation")
    wanted = frozenset(targets)
    tombs: dict[str, Tombstone]
    if not ids:
        # ETSI 020 6.8: every key shared by exactly these SAEs (and, for a
        # neighbour's void, that came from that neighbour).
        ids = [r[0] for r in conn.execute(
            "SELECT key_id FROM keys WHERE master = ? AND (? IS NULL OR upstream = ?) "
            "ORDER BY created_us, key_id", (initiator, upstream, upstream))]
        grants = grants_of(conn, ids) if ids else {}
        ids = [k for k in ids if frozenset(grants[k]) == wanted]
        tombs = {}
        rows = rows_of(conn, ids) if ids else {}
    else:
        rows = rows_of(conn, ids)
        grants = grants_of(conn, ids)
        tombs = tombstones_of(conn, ids)
        if upstream is not None:
            _check_upstream(ids, rows, grants, tombs, initiator, wanted, upstream)

    voided: list[str] = []
    failed: list[str] = []
    absent: list[str] = []
    burials: list[Burial] = []
    bits = 0
    for key_id in ids:
        row = rows.get(key_id)
        if row is not None and _ours(row, grants[key_id], initiator, wanted):
            if any(t is not None for t in grants[key_id].values()):
                failed.append(key_id)
            else:
                voided.append(key_id)
                bits += row.size_bits
                burials.append(Burial(key_id, row.master, list(grants[key_id]), row.upstream))
            continue
        tomb = tombs.get(key_id)
        if row is None and tomb is not None and tomb.master == initiator and (
                tomb.allowed == wanted):
            (failed if tomb.state == "taken" else voided).append(key_id)
            continue
        absent.append(key_id)
        if row is None and tomb is None:
            # Voided before it arrived (the void overtook a delivery that
            # failed on the way back): it must never be stored.
            burials.append(Burial(key_id, initiator, sorted(wanted), upstream or ""))
    bury(conn, burials, "voided", now_us, ttl_us)
    return VoidOutcome(tuple(uuid.UUID(k) for k in voided),
                       tuple(uuid.UUID(k) for k in failed),
                       tuple(uuid.UUID(k) for k in absent), bits)


def _ours(row: Row, grants: dict[str, int | None], initiator: str,
          wanted: frozenset[str]) -> bool:
    return row.master == initiator and frozenset(grants) == wanted


def _check_upstream(ids: Sequence[str], rows: dict[str, Row],
                    grants: dict[str, dict[str, int | None]], tombs: dict[str, Tombstone],
                    initiator: str, wanted: frozenset[str], upstream: str) -> None:
    for key_id in ids:
        row = rows.get(key_id)
        tomb = tombs.get(key_id)
        if row is not None:
            if not _ours(row, grants[key_id], initiator, wanted) or row.upstream == upstream:
                continue
            came_from = row.upstream
        elif tomb is not None and tomb.master == initiator and tomb.allowed == wanted:
            if tomb.upstream == upstream:
                continue
            came_from = tomb.upstream
        else:
            continue
        raise KmstnError(
            ErrorCode.PERMISSION_DENIED,
            f"key_ID {key_id} did not arrive from {upstream}; only the node it came from "
            "may void it",
            cause=f"key from {came_from or 'this node'}, void from {upstream}")
