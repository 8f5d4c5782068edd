"""Key stocks in the keyvault (issue 11): pending until settled, handed out once, bound."""

from __future__ import annotations

from pathlib import Path

from keyvault.store import Vault
from kme.errors import ErrorCode
from kme.types import StockId
from tests.unit.vaultkit import Clock, at, code_of, key, open_vault

STOCK = StockId("C", "sae-m", ("sae-s",))


def _vault(tmp_path: Path) -> tuple[Vault, Clock]:
    clock = Clock()
    return open_vault(tmp_path / "kv.db", clock), clock


def test_pending_keys_are_never_handed_out_and_ready_ones_once(tmp_path: Path) -> None:
    vault, _ = _vault(tmp_path)
    keys = [key() for _ in range(3)]
    assert vault.stock_put(STOCK, keys, at(600)) == 3
    # The fill has not been acknowledged: nothing can be taken yet.
    assert code_of(vault.stock_take, STOCK, 1, 256) is ErrorCode.INSUFFICIENT_KEY
    assert {e.state for e in vault.stock_list()} == {"pending"}
    assert vault.stock_settle([k.key_id for k in keys], ready=True) == 3
    # All or none: four are not there, so none is taken.
    assert code_of(vault.stock_take, STOCK, 4, 256) is ErrorCode.INSUFFICIENT_KEY
    assert vault.stock_take(STOCK, 2, 256) == keys[:2]  # oldest first
    assert vault.stock_take(STOCK, 1, 256) == keys[2:]
    assert code_of(vault.stock_take, STOCK, 1, 256) is ErrorCode.INSUFFICIENT_KEY
    # Handed keys stay listed (both ends can be compared), without their bytes.
    assert [e.state for e in vault.stock_list()] == ["handed"] * 3
    assert vault.stock_list(states=("pending", "ready")) == []
    assert len(vault.stock_list(1, ("handed",))) == 1
    with vault._db.read() as conn:
        records = {bytes(r[0]) for r in conn.execute("SELECT record FROM stock")}
    assert records == {b""}
    vault.close()


def test_a_stock_serves_only_its_own_pair_size_and_time(tmp_path: Path) -> None:
    vault, clock = _vault(tmp_path)
    k = key()
    vault.stock_put(STOCK, [k], at(60))
    vault.stock_settle([k.key_id], ready=True)
    for other in (StockId("C", "sae-x", ("sae-s",)), StockId("C", "sae-m", ("sae-t",)),
                  StockId("D", "sae-m", ("sae-s",))):
        assert code_of(vault.stock_take, other, 1, 256) is ErrorCode.INSUFFICIENT_KEY
    assert code_of(vault.stock_take, STOCK, 1, 128) is ErrorCode.INSUFFICIENT_KEY
    clock.now += 61  # expired: the relay voids it at the destination, never hands it out
    assert code_of(vault.stock_take, STOCK, 1, 256) is ErrorCode.INSUFFICIENT_KEY
    assert [e.state for e in vault.stock_list()] == ["ready"]
    vault.close()


def test_a_known_key_id_is_refused_and_deleted_entries_go(tmp_path: Path) -> None:
    vault, _ = _vault(tmp_path)
    k = key()
    vault.stock_put(STOCK, [k], at(600))
    assert code_of(vault.stock_put, STOCK, [k, key()], at(600)) is ErrorCode.KEY_CONFLICT
    assert len(vault.stock_list()) == 1  # nothing of the refused batch was written
    assert vault.stock_settle([k.key_id], ready=False) == 1
    assert vault.stock_list() == []
    vault.close()


def test_a_stock_record_moved_to_another_stock_does_not_open(tmp_path: Path) -> None:
    vault, _ = _vault(tmp_path)
    k = key()
    vault.stock_put(STOCK, [k], at(600))
    vault.stock_settle([k.key_id], ready=True)
    with vault._db.write() as conn:  # an attacker with the file edits the row's stock
        conn.execute("UPDATE stock SET master = 'sae-x'")
    # The record's AEAD binds its stock: "stored record is damaged", nothing handed out.
    assert code_of(vault.stock_take, StockId("C", "sae-x", ("sae-s",)), 1, 256) is (
        ErrorCode.INTERNAL)
    assert [e.state for e in vault.stock_list()] == ["ready"]
    vault.close()
