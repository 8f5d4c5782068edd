"""Key stocks at the master's node: keys already relayed ahead, kept for one SAE pair.

A stock's keys are recorded *pending* before their fill leaves this node
and settled *ready* once the destination acknowledged storing them, so a
ready key is always held at the destination for the stock's slaves (ETSI
014 confirmed mode: any key ID a master gets is retrievable by its slave).
A take hands each ready key out once, oldest first, and in the same
transaction marks it *handed* and deletes its bytes (the entry stays until
it expires, so the two ends of a stock can be compared). Pending keys are
never handed out: after a crash the relay voids them at the destination and
deletes them here.

Each record is sealed like a key record, with the stock (destination,
master, slaves) bound into its associated data, so a record moved to another
stock or row does not open.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from keyvault.db import from_us, id_list
from keyvault.records import RecordCipher, RecordIdentity
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, StockEntry, StockId

__all__ = ["identity", "list_entries", "put", "settle", "take"]

_ORIGIN_PREFIX = "stock>"
# The ``ready`` column holds the state.
PENDING, READY, HANDED = 0, 1, 2
STATES = {PENDING: "pending", READY: "ready", HANDED: "handed"}


def identity(stock: StockId, key_id: uuid.UUID, size_bits: int) -> RecordIdentity:
    # The origin field carries the destination with a prefix no node ID has
    # (">" is not an ID character), so a stock record never opens as a key record.
    return RecordIdentity(key_id, size_bits, stock.master, stock.slaves,
                          _ORIGIN_PREFIX + stock.destination)


def _slaves(stock: StockId) -> str:
    return json.dumps(list(stock.slaves), separators=(",", ":"))


def put(conn: Any, cipher: RecordCipher, stock: StockId, keys: Sequence[Key],
        now_us: int, expires_us: int) -> int:
    """Record ``keys`` pending in ``stock``; a known key ID is a conflict (nothing written)."""
    ids = [str(k.key_id) for k in keys]
    if len(set(ids)) != len(ids):
        raise KmstnError(ErrorCode.INVALID_ARGUMENT, "a key_ID appears twice in the batch")
    known = conn.execute("SELECT key_id FROM stock WHERE key_id IN "
                         "(SELECT value FROM json_each(?))", (id_list(ids),)).fetchall()
    if known:
        raise KmstnError(ErrorCode.KEY_CONFLICT, f"key_ID {known[0][0]} is already stocked")
    seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM stock").fetchone()[0])
    conn.executemany(
        "INSERT INTO stock (key_id, destination, master, slaves, size_bits, ready, seq, "
        "created_us, expires_us, record) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
        [(str(k.key_id), stock.destination, stock.master, _slaves(stock), k.size_bits,
          seq + 1 + i, now_us, expires_us,
          cipher.seal(identity(stock, k.key_id, k.size_bits), k.material))
         for i, k in enumerate(keys)])
    return len(keys)


def settle(conn: Any, key_ids: Sequence[uuid.UUID], ready: bool) -> int:
    ids = [str(k) for k in key_ids]
    if not ids:
        return 0
    chosen = "key_id IN (SELECT value FROM json_each(?))"
    if ready:
        cur = conn.execute(f"UPDATE stock SET ready = {READY} WHERE ready = {PENDING} "  # noqa: S608 - constant text
                           f"AND {chosen}", (id_list(ids),))
    else:
        cur = conn.execute(f"DELETE FROM stock WHERE {chosen}", (id_list(ids),))  # noqa: S608
    return int(cur.rowcount)


def take(conn: Any, cipher: RecordCipher, stock: StockId, number: int, size_bits: int,
         now_us: int) -> list[Key]:
    """``number`` ready, unexpired keys of ``size_bits``, oldest first; all or none.

    They are marked handed and their bytes deleted in the same transaction.
    """
    rows = conn.execute(
        "SELECT key_id, record FROM stock WHERE destination = ? AND master = ? AND slaves = ? "  # noqa: S608
        f"AND ready = {READY} AND size_bits = ? AND expires_us > ? ORDER BY seq LIMIT ?",
        (stock.destination, stock.master, _slaves(stock), size_bits, now_us, number)).fetchall()
    if len(rows) < number:
        raise KmstnError(ErrorCode.INSUFFICIENT_KEY,
                         f"stock {stock} holds {len(rows)} of the {number} keys asked for")
    keys = []
    for key_id, record in rows:
        kid = uuid.UUID(key_id)
        keys.append(Key(kid, cipher.open(identity(stock, kid, size_bits), record), size_bits))
    conn.execute(f"UPDATE stock SET ready = {HANDED}, record = X'' WHERE key_id IN "  # noqa: S608
                 "(SELECT value FROM json_each(?))", (id_list([str(k.key_id) for k in keys]),))
    return keys


def list_entries(conn: Any, limit: int = 0, states: Sequence[str] = ()) -> list[StockEntry]:
    """Entries oldest first, without bytes; only those in ``states`` if given."""
    codes = [c for c, name in STATES.items() if not states or name in states]
    if states and len(codes) != len(set(states)):
        raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                         f"states: each must be one of {', '.join(STATES.values())}")
    sql = ("SELECT key_id, destination, master, slaves, size_bits, ready, expires_us "
           "FROM stock WHERE ready IN (SELECT value FROM json_each(?)) ORDER BY seq")
    params: tuple[Any, ...] = (json.dumps(codes),)
    rows = conn.execute(sql + (" LIMIT ?" if limit else ""),
                        (*params, limit) if limit else params).fetchall()
    return [StockEntry(uuid.UUID(r[0]), StockId(r[1], r[2], tuple(json.loads(r[3]))),
                       int(r[4]), STATES[int(r[5])], from_us(int(r[6]))) for r in rows]
