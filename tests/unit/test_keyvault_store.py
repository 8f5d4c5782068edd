"""The Vault on a real SQLCipher file, with a controllable clock."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlcipher3

from keyvault.records import RecordCipher, derive_db_key
from keyvault.store import Sweeper, Vault
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, KeyGrant, SecretBytes
from tests.unit.vaultkit import ROOT, T0, Clock, code_of, key, open_vault, rec


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def vault(tmp_path: Path, clock: Clock) -> Iterator[Vault]:
    v = open_vault(tmp_path / "vault.db", clock)
    yield v
    v.close()


def test_store_take_once(vault: Vault) -> None:
    a, b = key(), key(12)
    assert vault.store([rec(a), rec(b)]) == 2
    assert vault.store([rec(a), rec(b)]) == 0  # idempotent repeat
    assert vault.take("s", "m", [b.key_id, a.key_id]) == [b, a]
    assert code_of(vault.take, "s", "m", [a.key_id]) is ErrorCode.KEY_NOT_FOUND
    assert vault.status() == ({}, 0)


def test_all_or_nothing(vault: Vault) -> None:
    a, b, c = key(), key(), key()
    vault.store([rec(a), rec(b, allowed=("t",)), rec(c, master="other")])
    assert code_of(vault.take, "s", "m", [a.key_id, uuid.uuid4()]) is ErrorCode.KEY_NOT_FOUND
    assert code_of(vault.take, "s", "m", [a.key_id, c.key_id]) is ErrorCode.KEY_NOT_FOUND
    assert code_of(vault.take, "s", "m", [a.key_id, b.key_id]) is ErrorCode.PERMISSION_DENIED
    # NOT_FOUND wins over PERMISSION_DENIED: the less said, the better.
    assert code_of(vault.take, "s", "m", [b.key_id, uuid.uuid4()]) is ErrorCode.KEY_NOT_FOUND
    assert code_of(vault.take, "s", "m", [a.key_id, a.key_id]) is ErrorCode.INVALID_ARGUMENT
    assert code_of(vault.take, "s", "m", []) is ErrorCode.INVALID_ARGUMENT
    assert vault.holds("s", "m", [a.key_id, b.key_id, c.key_id]) == {a.key_id}
    assert vault.take("s", "m", [a.key_id]) == [a]


def test_multicast_each_sae_once_then_row_deleted(vault: Vault, tmp_path: Path) -> None:
    k = key()
    vault.store([rec(k, allowed=("s", "t", "u"))])
    assert vault.take("t", "m", [k.key_id]) == [k]
    assert code_of(vault.take, "t", "m", [k.key_id]) is ErrorCode.KEY_NOT_FOUND
    assert vault.status() == ({("m", "s"): 1, ("m", "u"): 1}, 1)
    [info] = vault.list_pending(10)
    assert (info.allowed_sae_ids, info.taken_by_sae_ids) == (("s", "t", "u"), ("t",))
    assert vault.take("s", "m", [k.key_id]) == [k]
    assert vault.take("u", "m", [k.key_id]) == [k]
    assert vault.list_pending(10) == []
    # The last take deleted the row and its grants in the same transaction.
    conn = sqlcipher3.connect(str(tmp_path / "vault.db"))
    conn.execute(f"PRAGMA key = \"x'{derive_db_key(ROOT).reveal().hex()}'\"")
    assert conn.execute("SELECT count(*) FROM keys").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM grants").fetchone()[0] == 0
    assert conn.execute("SELECT state FROM tombstones").fetchall() == [("taken",)]
    conn.close()


def test_conflicts_and_tombstones(vault: Vault, clock: Clock) -> None:
    k = key()
    vault.store([rec(k)])
    flipped = Key(k.key_id, SecretBytes(bytes(b ^ 1 for b in k.material.reveal())), 256)
    for bad in (rec(flipped), rec(k, allowed=("s", "t")), rec(k, master="x"),
                rec(k, origin="B")):
        assert code_of(vault.store, [bad]) is ErrorCode.KEY_CONFLICT
    assert code_of(vault.store, [rec(key()), rec(key()), rec(flipped)]) is ErrorCode.KEY_CONFLICT
    assert vault.status() == ({("m", "s"): 1}, 1)  # the failed batches left nothing
    dup = key()
    assert code_of(vault.store, [rec(dup), rec(dup)]) is ErrorCode.INVALID_ARGUMENT
    assert vault.take("s", "m", [k.key_id]) == [k]  # the original, unchanged
    assert code_of(vault.store, [rec(k)]) is ErrorCode.KEY_CONFLICT
    # Tombstones are kept for tombstone_ttl_s, then forgotten.
    clock.now += 3601
    vault.sweep()
    assert vault.store([rec(k, ttl=7200)]) == 1


def test_void(vault: Vault) -> None:
    fresh, taken, multi_partly, other, other_master = key(), key(), key(), key(), key()
    vault.store([rec(fresh), rec(taken), rec(multi_partly, allowed=("s", "t")),
                 rec(other, allowed=("s", "t")), rec(other_master, master="x")])
    vault.take("s", "m", [taken.key_id])
    vault.take("t", "m", [multi_partly.key_id])
    unknown = uuid.uuid4()
    out = vault.void([fresh.key_id, taken.key_id, unknown, other.key_id,
                      other_master.key_id], "m", ["s"])
    assert out.voided == (fresh.key_id,)
    assert out.failed_to_void == (taken.key_id,)
    assert out.not_present == (unknown, other.key_id, other_master.key_id)
    # Voiding again is harmless; a partly delivered key cannot be voided.
    assert vault.void([fresh.key_id], "m", ["s"]).voided == (fresh.key_id,)
    assert vault.void([multi_partly.key_id], "m", ["t", "s"]).failed_to_void == (
        multi_partly.key_id,)
    assert vault.take("s", "m", [multi_partly.key_id]) == [multi_partly]
    assert code_of(vault.take, "s", "m", [fresh.key_id]) is ErrorCode.KEY_NOT_FOUND
    assert code_of(vault.store, [rec(fresh)]) is ErrorCode.KEY_CONFLICT
    with pytest.raises(KmstnError) as err:
        vault.void([], "m", ["s", "t"])
    assert (err.value.code, err.value.reason) == (ErrorCode.INVALID_ARGUMENT,
                                                  "no_all_confirmation")
    a, b = key(), key()
    vault.store([rec(a, allowed=("t", "s")), rec(b, allowed=("t", "s"))])
    vault.take("s", "m", [b.key_id])
    out = vault.void([], "m", ["s", "t"], all_confirmation=True)
    assert set(out.voided) == {other.key_id, a.key_id}
    assert out.failed_to_void == (b.key_id,)
    assert vault.holds("s", "x", [other_master.key_id]) == {other_master.key_id}


def test_a_void_that_overtakes_its_key_keeps_the_key_out(vault: Vault) -> None:
    """The void after a failed delivery can reach a node before the copy that was
    still on its way: the ID is tombstoned, so the late copy is refused."""
    late = key()
    out = vault.void([late.key_id], "m", ["s"])
    assert out.not_present == (late.key_id,)
    assert code_of(vault.store, [rec(late)]) is ErrorCode.KEY_CONFLICT
    assert code_of(vault.take, "s", "m", [late.key_id]) is ErrorCode.KEY_NOT_FOUND
    assert vault.status() == ({}, 0)
    # Voiding it again reports it voided: it is.
    assert vault.void([late.key_id], "m", ["s"]).voided == (late.key_id,)


def test_expiry_sweep(vault: Vault, clock: Clock) -> None:
    soon, late = key(), key()
    vault.store([rec(soon, ttl=10), rec(late, ttl=100)])
    expired, next_us = vault.sweep()
    assert expired == [] and next_us == int((T0 + 10) * 1e6)
    clock.now = T0 + 10
    # Due but not swept yet: already not takeable.
    assert code_of(vault.take, "s", "m", [soon.key_id]) is ErrorCode.KEY_NOT_FOUND
    assert vault.holds("s", "m", [soon.key_id]) == set()
    assert code_of(vault.store, [rec(soon, ttl=10)]) is ErrorCode.KEY_CONFLICT
    expired, next_us = vault.sweep()
    assert expired == [soon.key_id] and next_us == int((T0 + 100) * 1e6)
    assert code_of(vault.store, [rec(soon, ttl=1000)]) is ErrorCode.KEY_CONFLICT
    assert vault.void([soon.key_id], "m", ["s"]).voided == (soon.key_id,)
    assert [i.key_id for i in vault.list_pending(10)] == [late.key_id]


def test_list_pending_order_filter_limit(vault: Vault) -> None:
    ks = [key() for _ in range(4)]
    vault.store([rec(ks[2], created=T0 - 1), rec(ks[0], created=T0 - 3),
                 rec(ks[3], allowed=("t",)), rec(ks[1], created=T0 - 2)])
    assert [i.key_id for i in vault.list_pending(10)] == [k.key_id for k in ks]
    assert [i.key_id for i in vault.list_pending(2)] == [ks[0].key_id, ks[1].key_id]
    assert [i.key_id for i in vault.list_pending(10, "t")] == [ks[3].key_id]
    info = vault.list_pending(1)[0]
    assert info.created_at == dt.datetime.fromtimestamp(T0 - 3, dt.UTC)
    assert (info.master_sae_id, info.origin_node_id, info.size_bits) == ("m", "A", 256)


def test_status_filters(vault: Vault) -> None:
    vault.store([rec(key(), "m1", ("s", "t")), rec(key(), "m1", ("s",)),
                 rec(key(), "m2", ("t",))])
    assert vault.status() == ({("m1", "s"): 2, ("m1", "t"): 1, ("m2", "t"): 1}, 3)
    assert vault.status("m1") == ({("m1", "s"): 2, ("m1", "t"): 1}, 2)
    assert vault.status(slave="t") == ({("m1", "t"): 1, ("m2", "t"): 1}, 2)
    assert vault.status("m2", "s") == ({}, 0)


def test_sixteen_concurrent_takers_one_winner(vault: Vault) -> None:
    k = key()
    vault.store([rec(k)])
    barrier = threading.Barrier(16)
    results: list[object] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(vault.take("s", "m", [k.key_id]))
        except KmstnError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count([k]) == 1
    assert results.count(ErrorCode.KEY_NOT_FOUND) == 15


def test_waiting_take_is_woken_by_store(vault: Vault) -> None:
    k = key()
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(vault.take("s", "m", [k.key_id], 30)))
    thread.start()
    vault.store([rec(key())])  # an unrelated store wakes it; it goes back to waiting
    vault.store([rec(k)])
    thread.join(30)
    assert out == [[k]]
    # A short wait for a key that never comes ends in NOT_FOUND.
    assert code_of(vault.take, "s", "m", [uuid.uuid4()], 0.05) is ErrorCode.KEY_NOT_FOUND
    # No waiting for keys that cannot arrive any more (taken), or wrong SAE.
    started = time.monotonic()
    assert code_of(vault.take, "s", "m", [k.key_id], 60) is ErrorCode.KEY_NOT_FOUND
    other = key()
    vault.store([rec(other, allowed=("t",))])
    assert code_of(vault.take, "s", "m", [other.key_id, uuid.uuid4()], 60) is (
        ErrorCode.KEY_NOT_FOUND)
    assert code_of(vault.take, "s", "m", [other.key_id], 60) is ErrorCode.PERMISSION_DENIED
    assert time.monotonic() - started < 45  # none of these sat out its 60 s wait


def test_record_copied_to_another_row_does_not_decrypt(vault: Vault, tmp_path: Path) -> None:
    a, b = key(), key()
    vault.store([rec(a), rec(b)])
    conn = sqlcipher3.connect(str(tmp_path / "vault.db"), isolation_level=None)
    conn.execute(f"PRAGMA key = \"x'{derive_db_key(ROOT).reveal().hex()}'\"")
    conn.execute("UPDATE keys SET record = (SELECT record FROM keys WHERE key_id = ?) "
                 "WHERE key_id = ?", (str(a.key_id), str(b.key_id)))
    conn.close()
    with pytest.raises(KmstnError) as err:
        vault.take("s", "m", [b.key_id])
    assert err.value.code is ErrorCode.INTERNAL
    assert "damaged" in err.value.public
    # Nothing was consumed by the failed take.
    assert vault.holds("s", "m", [a.key_id, b.key_id]) == {a.key_id, b.key_id}
    assert vault.take("s", "m", [a.key_id]) == [a]


def test_database_is_encrypted_and_needs_its_key(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "vault.db"
    v = open_vault(path, clock)
    k = key()
    v.store([rec(k)])
    v.close()
    data = path.read_bytes()
    assert not data.startswith(b"SQLite format 3")
    assert k.material.reveal() not in data and str(k.key_id).encode() not in data
    with pytest.raises(KmstnError) as err:
        open_vault(path, clock, root=SecretBytes(os.urandom(32)))
    assert err.value.code is ErrorCode.SEALED
    v = open_vault(path, clock)
    assert v.take("s", "m", [k.key_id]) == [k]
    v.close()
    assert code_of(v.holds, "s", "m", [k.key_id]) is ErrorCode.UNAVAILABLE


def test_sweeper_thread_expires_keys_when_due(tmp_path: Path) -> None:
    v = Vault.open(tmp_path / "vault.db", derive_db_key(ROOT), RecordCipher.from_root(ROOT),
                   tombstone_ttl_s=3600)
    sweeper = Sweeper(v, logging.getLogger("test"))
    sweeper.start()
    try:
        now = dt.datetime.now(dt.UTC)
        keep, drop = key(), key()
        # The sweeper sleeps until the hour-long key; the store must wake it.
        v.store([KeyGrant(keep, "m", ("s",), "A", created_at=now,
                          expires_at=now + dt.timedelta(hours=1))])
        v.store([KeyGrant(drop, "m", ("s",), "A", created_at=now,
                          expires_at=now + dt.timedelta(seconds=0.3))])
        # Watch the table itself: take and status already hide due keys.
        conn = sqlcipher3.connect(str(tmp_path / "vault.db"))
        conn.execute(f"PRAGMA key = \"x'{derive_db_key(ROOT).reveal().hex()}'\"")
        deadline = time.monotonic() + 30
        while conn.execute("SELECT key_id, state FROM tombstones").fetchall() != [
                (str(drop.key_id), "expired")]:
            assert time.monotonic() < deadline, "the sweeper did not expire the key"
            time.sleep(0.05)
        assert conn.execute("SELECT key_id FROM keys").fetchall() == [(str(keep.key_id),)]
        conn.close()
    finally:
        sweeper.stop()
        v.close()


def test_take_for_a_caller_that_gave_up_consumes_nothing(vault: Vault) -> None:
    """A take whose caller is gone by commit time rolls back: the key is not lost."""
    k = key()
    vault.store([rec(k)])
    with pytest.raises(KmstnError) as err:
        vault.take("s", "m", [k.key_id], still_wanted=lambda: False)
    assert err.value.code is ErrorCode.TIMEOUT
    assert vault.take("s", "m", [k.key_id], still_wanted=lambda: True)[0].material == k.material
