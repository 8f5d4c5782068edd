"""Issue 16 in the vault: the upstream neighbour of each key, voids by neighbour, resends.

Every test runs the Vault on a real SQLCipher file. "Changes nothing" is
checked on the tables themselves, read through a second connection.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlcipher3

from keyvault.records import derive_db_key
from keyvault.store import Vault
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, SecretBytes
from tests.unit.vaultkit import ROOT, T0, Clock, code_of, job, key, open_vault, rec


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vault.db"


@pytest.fixture
def vault(path: Path, clock: Clock) -> Iterator[Vault]:
    v = open_vault(path, clock)
    yield v
    v.close()


def tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (a snapshot to compare before and after)."""
    conn = sqlcipher3.connect(str(path))
    conn.execute(f"PRAGMA key = \"x'{derive_db_key(ROOT).reveal().hex()}'\"")
    out = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)  # noqa: S608
           for t in ("keys", "grants", "tombstones", "jobs")}
    conn.close()
    return out


def flipped(k: Key) -> Key:
    return Key(k.key_id, SecretBytes(bytes(b ^ 1 for b in k.material.reveal())), k.size_bits)


# -- voids on behalf of a neighbour -------------------------------------------------


def test_a_neighbour_voids_only_keys_that_came_from_it(vault: Vault, path: Path) -> None:
    from_b, from_c, made_here = key(), key(), key()
    vault.store([rec(from_b, upstream="B"), rec(from_c, upstream="C"), rec(made_here)])
    before = tables(path)
    for other in (from_c, made_here):
        with pytest.raises(KmstnError) as err:
            vault.void([from_b.key_id, other.key_id], "m", ["s"], upstream="B")
        assert err.value.code is ErrorCode.PERMISSION_DENIED
        assert str(other.key_id) in err.value.public
    # Refused as a whole: the key from B, named with the others, is still there.
    assert tables(path) == before
    out = vault.void([from_b.key_id], "m", ["s"], upstream="B")
    assert out.voided == (from_b.key_id,)
    # The node's own void (no upstream) is not restricted.
    out = vault.void([from_c.key_id, made_here.key_id], "m", ["s"])
    assert out.voided == (from_c.key_id, made_here.key_id)


def test_a_refused_void_records_no_job(vault: Vault, path: Path) -> None:
    theirs = key()
    vault.store([rec(theirs, upstream="C")])
    before = tables(path)
    code = code_of(vault.void, [theirs.key_id], "m", ["s"], upstream="B", jobs=[job()])
    assert code is ErrorCode.PERMISSION_DENIED
    assert tables(path) == before


def test_void_all_from_a_neighbour_touches_only_its_keys(vault: Vault) -> None:
    b1, b2, c1, mine, other_set = key(), key(), key(), key(), key()
    vault.store([rec(b1, upstream="B"), rec(b2, upstream="B"), rec(c1, upstream="C"),
                 rec(mine), rec(other_set, allowed=("s", "t"), upstream="B")])
    out = vault.void([], "m", ["s"], all_confirmation=True, upstream="B")
    assert set(out.voided) == {b1.key_id, b2.key_id}
    assert out.failed_to_void == () and out.not_present == ()
    assert vault.holds("s", "m", [c1.key_id, mine.key_id, other_set.key_id]) == {
        c1.key_id, mine.key_id, other_set.key_id}


def test_upstream_rules_cover_taken_keys_and_hide_other_sae_sets(vault: Vault) -> None:
    taken_c, other_set_c = key(), key()
    vault.store([rec(taken_c, upstream="C"), rec(other_set_c, allowed=("t",), upstream="C")])
    vault.take("s", "m", [taken_c.key_id])
    # A delivered key from C: B may not even ask (its tombstone records C).
    assert code_of(vault.void, [taken_c.key_id], "m", ["s"],
                   upstream="B") is ErrorCode.PERMISSION_DENIED
    assert vault.void([taken_c.key_id], "m", ["s"], upstream="C").failed_to_void == (
        taken_c.key_id,)
    # A key of another SAE set is "not present", as for any void: a refusal
    # would tell B that the key exists.
    out = vault.void([other_set_c.key_id], "m", ["s"], upstream="B")
    assert out.not_present == (other_set_c.key_id,)
    assert vault.holds("t", "m", [other_set_c.key_id]) == {other_set_c.key_id}


def test_a_void_that_overtakes_its_key_records_who_sent_it(vault: Vault) -> None:
    late = uuid.uuid4()
    assert vault.void([late], "m", ["s"], upstream="B").not_present == (late,)
    # B voiding it again is B's own key ID; C may not.
    assert vault.void([late], "m", ["s"], upstream="B").voided == (late,)
    assert code_of(vault.void, [late], "m", ["s"], upstream="C") is ErrorCode.PERMISSION_DENIED
    assert code_of(vault.store, [rec(Key(late, SecretBytes(bytes(32)), 256),
                                     upstream="B")]) is ErrorCode.KEY_CONFLICT


def test_list_pending_shows_the_upstream(vault: Vault) -> None:
    a, b = key(), key()
    vault.store([rec(a, upstream="B"), rec(b)])
    got = {i.key_id: i.upstream_node_id for i in vault.list_pending(10)}
    assert got == {a.key_id: "B", b.key_id: None}


# -- resends ------------------------------------------------------------------------


def test_an_identical_resend_is_reported_per_key(vault: Vault, path: Path) -> None:
    held, delivered, fresh = key(), key(), key()
    first = vault.store_keys([rec(held, upstream="B"), rec(delivered, upstream="B")])
    assert first.stored == (held.key_id, delivered.key_id)
    assert vault.take("s", "m", [delivered.key_id]) == [delivered]
    before = tables(path)
    again = vault.store_keys([rec(fresh, upstream="B"), rec(held, upstream="B"),
                              rec(delivered, upstream="B")])
    assert again.stored == (fresh.key_id,)
    assert again.already_held == (held.key_id,)
    assert again.already_delivered == (delivered.key_id,)
    # The delivered key was not stored again: never deliverable twice.
    assert code_of(vault.take, "s", "m", [delivered.key_id]) is ErrorCode.KEY_NOT_FOUND
    after = tables(path)
    assert after["tombstones"] == before["tombstones"]
    assert len(after["keys"]) == len(before["keys"]) + 1
    # The old count API says the same.
    assert vault.store([rec(delivered, upstream="B"), rec(held, upstream="B")]) == 0


def test_a_multicast_key_taken_by_all_is_delivered(vault: Vault) -> None:
    k = key()
    vault.store([rec(k, allowed=("s", "t"), upstream="B")])
    vault.take("s", "m", [k.key_id])
    # One copy still waits: the resend finds it held.
    assert vault.store_keys([rec(k, allowed=("t", "s"), upstream="B")]).already_held == (
        k.key_id,)
    vault.take("t", "m", [k.key_id])
    assert vault.store_keys([rec(k, allowed=("t", "s"), upstream="B")]).already_delivered == (
        k.key_id,)


def test_every_real_conflict_changes_nothing(vault: Vault, path: Path, clock: Clock) -> None:
    held, delivered, voided, expired = key(), key(), key(), key()
    vault.store([rec(held, upstream="B"), rec(delivered, upstream="B"),
                 rec(voided, upstream="B"), rec(expired, upstream="B", ttl=5)])
    vault.take("s", "m", [delivered.key_id])
    vault.void([voided.key_id], "m", ["s"], upstream="B")
    clock.now = T0 + 10
    vault.sweep()
    before = tables(path)
    fresh = key()
    for k in (held, delivered):
        for bad in (rec(flipped(k), upstream="B"), rec(k, allowed=("s", "t"), upstream="B"),
                    rec(k, master="x", upstream="B"), rec(k, origin="C", upstream="B"),
                    rec(k, upstream="C"), rec(k)):
            assert code_of(vault.store_keys, [rec(fresh, upstream="B"), bad]) is (
                ErrorCode.KEY_CONFLICT), (k is held, bad)
    # A voided or expired key is never taken back, even byte-identical.
    for k in (voided, expired):
        assert code_of(vault.store_keys, [rec(k, upstream="B", ttl=600)]) is (
            ErrorCode.KEY_CONFLICT)
    assert tables(path) == before


def test_a_delivered_key_made_here_is_a_conflict(vault: Vault) -> None:
    """No neighbour resends a key this node made: a repeat is a device's repeated ID."""
    k = key()
    vault.store([rec(k)])
    vault.take("s", "m", [k.key_id])
    assert code_of(vault.store, [rec(k)]) is ErrorCode.KEY_CONFLICT


def test_the_tombstone_keeps_a_keyed_fingerprint_never_the_key(vault: Vault, path: Path
                                                                ) -> None:
    import hashlib

    from_b, made_here = key(), key()
    vault.store([rec(from_b, upstream="B"), rec(made_here)])
    vault.take("s", "m", [from_b.key_id, made_here.key_id])
    tombs = {r[0]: r for r in tables(path)["tombstones"]}
    columns = ("key_id", "state", "master", "allowed", "at_us", "purge_us", "upstream",
               "fingerprint")
    row = dict(zip(columns, tombs[str(from_b.key_id)], strict=True))
    assert (row["state"], row["upstream"]) == ("taken", "B")
    fp = bytes(row["fingerprint"])
    assert len(fp) == 32
    raw = from_b.material.reveal()
    assert raw not in fp and fp not in (hashlib.sha256(raw).digest(),
                                        hashlib.sha256(from_b.key_id.bytes + raw).digest())
    # A key made here cannot be resent, so nothing of it is kept.
    assert tombs[str(made_here.key_id)][7] is None
    assert raw not in path.read_bytes()
