"""Schema 1 -> 2: a vault file written by the first release opens and keeps its keys.

``tests/vectors/keyvault-schema1.db`` was written by the schema-1 keyvault
(commit 0172302; how, in tests/vectors/PROVENANCE.md): five keys stored at
T0 expiring at T0 + 1 h, one of them taken by one of its two SAEs, one
taken, one voided, and a void that overtook a key never stored.
"""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlcipher3

from keyvault.db import SCHEMA_VERSION
from keyvault.records import RecordCipher, derive_db_key
from keyvault.store import Vault
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, SecretBytes, StockId
from tests.unit.vaultkit import T0, Clock, code_of, job, rec

VECTOR = Path(__file__).resolve().parent.parent / "vectors" / "keyvault-schema1.db"
ROOT = SecretBytes(bytes.fromhex(
    "6b6d73746e2d736368656d612d312d766563746f722d726f6f742d2d2d2d2d21"))


def _id(n: int) -> uuid.UUID:
    return uuid.UUID(f"5c0e0001-0000-4000-8000-{n:012x}")


def _key(n: int, value: str, bits: int = 256) -> Key:
    return Key(_id(n), SecretBytes(bytes.fromhex(value)), bits)


WAITING = _key(1, "01080f161d242b323940474e555c636a71787f868d949ba2a9b0b7bec5ccd3da")
MULTI = _key(2, "020910171e252c333a41484f565d646b727980878e959ca3aab1b8bfc6cdd4db")
TAKEN = _key(3, "030a11181f262d343b424950575e656c737a81888f969da4abb2b9c0c7ced5dc")
VOIDED = _key(4, "040b121920272e353c434a51585f666d747b828990979ea5acb3bac1c8cfd6dd")
SHORT = _key(5, "0500", 12)
OVERTAKEN = _id(6)


def _connect(path: Path) -> Any:
    conn = sqlcipher3.connect(str(path))
    conn.execute(f"PRAGMA key = \"x'{derive_db_key(ROOT).reveal().hex()}'\"")
    return conn


def _schema(path: Path) -> dict[str, Any]:
    """Tables (columns, types, NOT NULL, defaults, keys, WITHOUT ROWID) and indexes
    (table, columns), compared by structure: the stored SQL text differs in layout."""
    conn = _connect(path)
    out: dict[str, Any] = {}
    for kind, name, table, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"):
        if kind == "table":
            out[name] = (list(conn.execute(f"PRAGMA table_info({name})")),
                         "WITHOUT ROWID" in sql)
        elif kind == "index":
            out[name] = (table, list(conn.execute(f"PRAGMA index_info({name})")))
    conn.close()
    return out


def _open(path: Path, clock: Clock) -> Vault:
    return Vault.open(path, derive_db_key(ROOT), RecordCipher.from_root(ROOT),
                      tombstone_ttl_s=3600, clock=clock)


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "vault.db"
    shutil.copyfile(VECTOR, path)
    return path


def test_the_vector_is_a_schema_1_file(old_file: Path) -> None:
    conn = _connect(old_file)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "upstream" not in [r[1] for r in conn.execute("PRAGMA table_info(keys)")]
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'jobs'"
                        ).fetchone()[0] == 0
    conn.close()


def test_a_schema_1_file_opens_migrated_and_keeps_every_key(old_file: Path,
                                                            tmp_path: Path) -> None:
    clock = Clock()
    clock.now = T0 + 10
    vault = _open(old_file, clock)
    try:
        assert vault.status() == ({("sae-m", "sae-s"): 2, ("sae-m", "sae-t"): 1}, 3)
        pending = {i.key_id: i for i in vault.list_pending(10)}
        assert set(pending) == {WAITING.key_id, MULTI.key_id, SHORT.key_id}
        assert pending[MULTI.key_id].taken_by_sae_ids == ("sae-s",)
        assert all(i.upstream_node_id is None for i in pending.values())
        # The old records decrypt: bytes, sizes and the partial take are intact.
        assert vault.take("sae-s", "sae-m", [WAITING.key_id, SHORT.key_id]) == [WAITING, SHORT]
        assert vault.take("sae-t", "sae-m", [MULTI.key_id]) == [MULTI]
        assert code_of(vault.take, "sae-s", "sae-m", [MULTI.key_id]) is ErrorCode.KEY_NOT_FOUND
        # Old tombstones still keep keys out (they have no fingerprint, so no
        # resend of them can be proven identical).
        for k in (TAKEN, VOIDED):
            for upstream in (None, "B"):
                grant = rec(k, "sae-m", ("sae-s",), "B", upstream=upstream)
                assert code_of(vault.store_keys, [grant]) is ErrorCode.KEY_CONFLICT
        overtaken = Key(OVERTAKEN, SecretBytes(bytes(32)), 256)
        assert code_of(vault.store, [rec(overtaken, "sae-m", ("sae-s",))]) is (
            ErrorCode.KEY_CONFLICT)
        # Keys of unknown provenance count as made here: no neighbour may void them.
        assert vault.void([TAKEN.key_id], "sae-m", ["sae-s"]).failed_to_void == (TAKEN.key_id,)
        assert code_of(vault.void, [TAKEN.key_id], "sae-m", ["sae-s"],
                       upstream="B") is ErrorCode.PERMISSION_DENIED
        # The new tables work in the migrated file.
        j = job()
        vault.put_jobs([j])
        assert [x.job_id for x in vault.due_jobs(10).jobs] == [j.job_id]
        # Schema 3: the key stocks (issue 11) work in the migrated file too.
        stock = StockId("B", "sae-m", ("sae-s",))
        stocked = Key(uuid.uuid4(), SecretBytes(bytes(range(32))), 256)
        vault.stock_put(stock, [stocked], dt.datetime.fromtimestamp(T0 + 3600, dt.UTC))
        assert code_of(vault.stock_take, stock, 1, 256) is ErrorCode.INSUFFICIENT_KEY
        vault.stock_settle([stocked.key_id], ready=True)
        assert vault.stock_take(stock, 1, 256) == [stocked]
    finally:
        vault.close()

    conn = _connect(old_file)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()
    # A migrated file has exactly the schema of a new one.
    fresh = tmp_path / "fresh.db"
    _open(fresh, clock).close()
    assert _schema(old_file) == _schema(fresh)
    # Opening again migrates nothing and loses nothing.
    vault = _open(old_file, clock)
    try:
        assert [x.job_id for x in vault.due_jobs(10).jobs] == [j.job_id]
        assert vault.status() == ({}, 0)
    finally:
        vault.close()


def test_a_file_from_a_newer_kmstn_is_refused(old_file: Path) -> None:
    conn = _connect(old_file)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(KmstnError) as err:
        _open(old_file, Clock())
    assert err.value.code is ErrorCode.INTERNAL and "newer kmstn" in err.value.public
