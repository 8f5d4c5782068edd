"""The KeyVault contract against one real ``python -m keyvault`` process (real swtpm).

One process serves the whole module; every test uses fresh key IDs (and, where
counts matter, its own SAE names), so the tests do not see each other's keys.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyvault.client import KeyVaultClient
from kme.errors import ERROR_CODE_METADATA_KEY, ERROR_REASON_METADATA_KEY, ErrorCode, KmstnError
from kme.rpc.v1 import common_pb2, keyvault_pb2, keyvault_pb2_grpc
from kme.types import Key, SecretBytes
from tests.helpers import Pki
from tests.integration.keyvault_harness import VaultNode, item, new_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(pki: Pki) -> Iterator[VaultNode]:
    root = Path(tempfile.mkdtemp(prefix="km-", dir="/tmp"))
    vault = VaultNode(root, pki)
    vault.start()
    try:
        yield vault
    finally:
        vault.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def client(node: VaultNode) -> KeyVaultClient:
    return node.client()


@pytest.fixture
def stub(node: VaultNode) -> keyvault_pb2_grpc.KeyVaultStub:
    return keyvault_pb2_grpc.KeyVaultStub(node.channel())


def _trailing(err: grpc.RpcError) -> dict[str, Any]:
    metadata: Any = err.trailing_metadata()
    return {str(k): v for k, v in metadata or ()}


def _code(exc: pytest.ExceptionInfo[KmstnError]) -> ErrorCode:
    return exc.value.code


def test_store_take_round_trip(client: KeyVaultClient) -> None:
    keys = [new_key(256), new_key(512), new_key(12)]
    keys[2] = Key(keys[2].key_id, SecretBytes(b"\xab\xc0"), 12)  # 12 bits, pad bits zero
    assert client.store([item(k) for k in keys]) == 3
    # An identical resend (ETSI 020 ext_keys retry) is accepted and writes nothing.
    assert client.store([item(k) for k in keys]) == 0
    wanted = [keys[2].key_id, keys[0].key_id, keys[1].key_id]
    got = client.take("sae-s", "sae-m", wanted)
    assert [k.key_id for k in got] == wanted  # request order
    assert got == [keys[2], keys[0], keys[1]]  # bytes and sizes, constant-time compare
    with pytest.raises(KmstnError) as err:
        client.take("sae-s", "sae-m", [keys[0].key_id])
    assert _code(err) is ErrorCode.KEY_NOT_FOUND
    # A delivered key can never be stored again (tombstone), even byte-identical.
    with pytest.raises(KmstnError) as err:
        client.store([item(keys[0])])
    assert _code(err) is ErrorCode.KEY_CONFLICT


def test_take_once_under_16_concurrent_takers(node: VaultNode) -> None:
    clients = [node.client() for _ in range(16)]
    key = new_key()
    clients[0].store([item(key)])
    barrier = threading.Barrier(16)
    wins: list[Key] = []
    losses: list[ErrorCode] = []
    lock = threading.Lock()

    def taker(c: KeyVaultClient) -> None:
        barrier.wait()
        try:
            got = c.take("sae-s", "sae-m", [key.key_id])
        except KmstnError as exc:
            with lock:
                losses.append(exc.code)
        else:
            with lock:
                wins.extend(got)

    threads = [threading.Thread(target=taker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == [key]
    assert losses == [ErrorCode.KEY_NOT_FOUND] * 15


def test_multicast_key_once_per_sae_under_concurrency(node: VaultNode) -> None:
    clients = [node.client() for _ in range(16)]
    key = new_key()
    clients[0].store([item(key, allowed=("sae-s", "sae-t"))])
    barrier = threading.Barrier(16)
    wins: list[str] = []
    losses: list[ErrorCode] = []
    lock = threading.Lock()

    def taker(c: KeyVaultClient, sae: str) -> None:
        barrier.wait()
        try:
            got = c.take(sae, "sae-m", [key.key_id])
        except KmstnError as exc:
            with lock:
                losses.append(exc.code)
        else:
            with lock:
                wins.extend(sae for k in got if k == key)

    threads = [threading.Thread(target=taker, args=(c, ("sae-s", "sae-t")[i % 2]))
               for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == ["sae-s", "sae-t"]
    assert losses == [ErrorCode.KEY_NOT_FOUND] * 14
    # The last copy is gone, and with it the record.
    assert str(key.key_id) not in {k.key_id for k in clients[0].list_pending(10_000)}


def test_all_or_nothing_and_access_rules(client: KeyVaultClient) -> None:
    a, b = new_key(), new_key()
    client.store([item(a), item(b, allowed=("sae-t",))])
    unknown = uuid.uuid4()
    # An unknown ID among known ones: NOT_FOUND, and nothing is consumed.
    with pytest.raises(KmstnError) as err:
        client.take("sae-s", "sae-m", [a.key_id, unknown])
    assert _code(err) is ErrorCode.KEY_NOT_FOUND
    assert str(unknown) in err.value.public
    # The right key but another master: NOT_FOUND, revealing nothing.
    with pytest.raises(KmstnError) as err:
        client.take("sae-s", "sae-u", [a.key_id])
    assert _code(err) is ErrorCode.KEY_NOT_FOUND
    # Held for this master, but the caller is not named for it.
    with pytest.raises(KmstnError) as err:
        client.take("sae-s", "sae-m", [a.key_id, b.key_id])
    assert _code(err) is ErrorCode.PERMISSION_DENIED
    assert client.holds("sae-s", "sae-m", [a.key_id, b.key_id, unknown]) == {a.key_id}
    assert client.holds("sae-t", "sae-m", [a.key_id, b.key_id]) == {b.key_id}
    assert client.holds("sae-t", "sae-u", [b.key_id]) == set()
    assert client.take("sae-s", "sae-m", [a.key_id]) == [a]
    assert client.take("sae-t", "sae-m", [b.key_id]) == [b]
    # A multicast key: an SAE that took its copy gets KEY_NOT_FOUND, the other still can.
    multi = new_key()
    client.store([item(multi, allowed=("sae-s", "sae-t"))])
    assert client.take("sae-s", "sae-m", [multi.key_id]) == [multi]
    with pytest.raises(KmstnError) as err:
        client.take("sae-s", "sae-m", [multi.key_id])
    assert _code(err) is ErrorCode.KEY_NOT_FOUND
    assert client.holds("sae-s", "sae-m", [multi.key_id]) == set()
    assert client.take("sae-t", "sae-m", [multi.key_id]) == [multi]


def test_conflicting_resend_leaves_original(client: KeyVaultClient) -> None:
    key = new_key()
    client.store([item(key)])
    other_bytes = Key(key.key_id, SecretBytes(bytes(b ^ 0xFF for b in key.material.reveal())),
                      256)
    fresh = new_key()
    with pytest.raises(KmstnError) as err:
        client.store([item(fresh), item(other_bytes)])
    assert _code(err) is ErrorCode.KEY_CONFLICT
    # Other metadata under the same ID conflicts too.
    with pytest.raises(KmstnError) as err:
        client.store([item(key, allowed=("sae-s", "sae-t"))])
    assert _code(err) is ErrorCode.KEY_CONFLICT
    # The batch was atomic: the fresh key of the failed batch was not stored.
    assert client.holds("sae-s", "sae-m", [fresh.key_id, key.key_id]) == {key.key_id}
    assert client.take("sae-s", "sae-m", [key.key_id]) == [key]


def test_status_and_list_pending(client: KeyVaultClient) -> None:
    master = f"m-{uuid.uuid4().hex[:8]}"
    old, mid, new = new_key(), new_key(), new_key()
    now = dt.datetime.now(dt.UTC)
    client.store([
        item(new, master, ("s1", "s2"), created_at=now),
        item(old, master, ("s1",), origin="Z", created_at=now - dt.timedelta(hours=2)),
        item(mid, master, ("s2",), created_at=now - dt.timedelta(hours=1),
             expires_at=now + dt.timedelta(days=2)),
    ])
    assert client.status(master) == {(master, "s1"): 2, (master, "s2"): 2}
    assert client.status(master, "s2") == {(master, "s2"): 2}
    client.take("s1", master, [new.key_id])
    assert client.status(master) == {(master, "s1"): 1, (master, "s2"): 2}

    pending = [p for p in client.list_pending(10_000) if p.master_sae_id == master]
    assert [p.key_id for p in pending] == [str(old.key_id), str(mid.key_id), str(new.key_id)]
    first = pending[0]
    assert (first.size_bits, first.origin_node_id, list(first.allowed_sae_ids)) == (
        256, "Z", ["s1"])
    assert first.created_at.ToDatetime(tzinfo=dt.UTC) == now - dt.timedelta(hours=2)
    assert pending[1].expires_at.ToDatetime(tzinfo=dt.UTC) == now + dt.timedelta(days=2)
    assert list(pending[2].taken_by_sae_ids) == ["s1"]
    assert list(pending[2].allowed_sae_ids) == ["s1", "s2"]
    only_s1 = [p.key_id for p in client.list_pending(10_000, sae_id="s1")
               if p.master_sae_id == master]
    assert only_s1 == [str(old.key_id)]
    assert len(client.list_pending(1)) == 1


def test_void_follows_etsi_020(client: KeyVaultClient, stub: keyvault_pb2_grpc.KeyVaultStub
                               ) -> None:
    master = f"m-{uuid.uuid4().hex[:8]}"
    fresh, delivered, multi, other_set = new_key(), new_key(), new_key(), new_key()
    client.store([item(fresh, master), item(delivered, master), item(multi, master),
                  item(other_set, master, ("sae-s", "sae-t"))])
    client.take("sae-s", master, [delivered.key_id])
    unknown = uuid.uuid4()
    acks = client.void([fresh.key_id, delivered.key_id, unknown, other_set.key_id],
                       master, ["sae-s"])
    by_status = {a.status: a for a in acks}
    assert set(by_status) == {common_pb2.ACK_STATUS_VOIDED, common_pb2.ACK_STATUS_FAILED_TO_VOID,
                              common_pb2.ACK_STATUS_KEY_NOT_PRESENT}
    assert list(by_status[common_pb2.ACK_STATUS_VOIDED].key_ids) == [str(fresh.key_id)]
    assert list(by_status[common_pb2.ACK_STATUS_FAILED_TO_VOID].key_ids) == [
        str(delivered.key_id)]
    # A key of another target set is "not present" for this void.
    assert list(by_status[common_pb2.ACK_STATUS_KEY_NOT_PRESENT].key_ids) == [
        str(unknown), str(other_set.key_id)]
    assert all(a.initiator_sae_id == master and list(a.target_sae_ids) == ["sae-s"]
               for a in acks)
    # ETSI 020 6.7: a voided key is never delivered, and never stored again.
    with pytest.raises(KmstnError) as err:
        client.take("sae-s", master, [fresh.key_id])
    assert err.value.code is ErrorCode.KEY_NOT_FOUND
    with pytest.raises(KmstnError) as err:
        client.store([item(fresh, master)])
    assert err.value.code is ErrorCode.KEY_CONFLICT

    # ETSI 020 6.8: an empty list needs all_confirmation ...
    with pytest.raises(grpc.RpcError) as rpc:
        stub.Void(keyvault_pb2.VoidRequest(initiator_sae_id=master, target_sae_ids=["sae-s"]),
                  timeout=10)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "all_confirmation" in (rpc.value.details() or "")
    trailing = _trailing(rpc.value)
    assert trailing[ERROR_CODE_METADATA_KEY] == "INVALID_ARGUMENT"
    assert trailing[ERROR_REASON_METADATA_KEY] == "no_all_confirmation"
    # ... and then voids only keys of exactly that initiator and target set.
    acks = client.void([], master, ["sae-s"], all_confirmation=True)
    assert [(a.status, list(a.key_ids)) for a in acks] == [
        (common_pb2.ACK_STATUS_VOIDED, [str(multi.key_id)])]
    assert client.holds("sae-s", master, [other_set.key_id]) == {other_set.key_id}
    assert client.take("sae-t", master, [other_set.key_id]) == [other_set]


def test_expiry_removes_keys_and_leaves_tombstones(client: KeyVaultClient) -> None:
    master = f"m-{uuid.uuid4().hex[:8]}"
    short, long = new_key(), new_key()
    now = dt.datetime.now(dt.UTC)
    client.store([item(short, master, expires_at=now + dt.timedelta(seconds=1)),
                  item(long, master)])
    # No timing assertion: wait (generously) for the expiry thread to act.
    deadline = time.monotonic() + 60
    while client.status(master) != {(master, "sae-s"): 1}:
        assert time.monotonic() < deadline, "the key did not expire"
        time.sleep(0.1)
    with pytest.raises(KmstnError) as err:
        client.take("sae-s", master, [short.key_id])
    assert err.value.code is ErrorCode.KEY_NOT_FOUND
    with pytest.raises(KmstnError) as err:
        client.store([item(short, master, expires_at=now + dt.timedelta(hours=1))])
    assert err.value.code is ErrorCode.KEY_CONFLICT
    assert client.take("sae-s", master, [long.key_id]) == [long]


def test_take_waits_for_a_key_in_flight(node: VaultNode) -> None:
    taker, storer = node.client(), node.client()
    key = new_key()
    got: list[Key] = []
    errors: list[KmstnError] = []

    def take() -> None:
        try:
            got.extend(taker.take("sae-s", "sae-m", [key.key_id], wait_ms=30_000))
        except KmstnError as exc:
            errors.append(exc)

    thread = threading.Thread(target=take)
    thread.start()
    time.sleep(0.3)  # give the take a head start; correctness does not depend on it
    storer.store([item(key)])
    thread.join(60)
    assert not thread.is_alive()
    assert errors == []
    assert got == [key]
    # Waiting never applies to a key already taken: the answer is immediate.
    started = time.monotonic()
    with pytest.raises(KmstnError) as err:
        taker.take("sae-s", "sae-m", [key.key_id], wait_ms=60_000)
    assert err.value.code is ErrorCode.KEY_NOT_FOUND
    assert time.monotonic() - started < 45  # it did not sit out the 60 s wait


def test_bad_input_gets_clear_codes(stub: keyvault_pb2_grpc.KeyVaultStub) -> None:
    good = keyvault_pb2.StoredKey(
        key=common_pb2.KeyMaterial(key_id=str(uuid.uuid4()), value=b"\x01" * 32, size_bits=256),
        master_sae_id="sae-m", allowed_sae_ids=["sae-s"], origin_node_id="A")

    def store_with(**changes: object) -> grpc.RpcError:
        msg = keyvault_pb2.StoredKey()
        msg.CopyFrom(good)
        for path, value in changes.items():
            target: object = msg
            parts = path.split("__")
            for p in parts[:-1]:
                target = getattr(target, p)
            if isinstance(value, list):
                field = getattr(target, parts[-1])
                del field[:]
                field.extend(value)
            else:
                setattr(target, parts[-1], value)
        with pytest.raises(grpc.RpcError) as err:
            stub.Store(keyvault_pb2.StoreRequest(keys=[msg]), timeout=10)
        return err.value

    cases = {
        "key__key_id": ("not-a-uuid", "keys[0].key.key_id"),
        "key__size_bits": (0, "keys[0].key.size_bits"),
        "key__value": (b"\x01" * 31, "keys[0].key.value"),
        "allowed_sae_ids": ([], "keys[0].allowed_sae_ids"),
        "master_sae_id": ("bad/sae", "keys[0].master_sae_id"),
        "origin_node_id": ("", "keys[0].origin_node_id"),
    }
    for field, (value, named) in cases.items():
        err = store_with(**{field: value})
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert named in (err.details() or ""), (field, err.details())
    err = store_with(key__size_bits=250)  # 250 bits in 32 bytes: the 6 pad bits are set
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pad bits" in (err.details() or "")
    err = store_with(allowed_sae_ids=["sae-s", "sae-s"])
    assert "listed twice" in (err.details() or "")
    with pytest.raises(grpc.RpcError) as rpc:
        stub.Store(keyvault_pb2.StoreRequest(), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    requests: list[tuple[Any, Any]] = [
        (stub.Take, keyvault_pb2.TakeRequest(sae_id="sae-s", master_sae_id="sae-m",
                                             key_ids=["{" + str(uuid.uuid4()) + "}"])),
        (stub.Take, keyvault_pb2.TakeRequest(sae_id="sae-s", master_sae_id="sae-m")),
        (stub.Take, keyvault_pb2.TakeRequest(sae_id="", master_sae_id="sae-m",
                                             key_ids=[str(uuid.uuid4())])),
        (stub.Take, keyvault_pb2.TakeRequest(sae_id="sae-s", master_sae_id="sae-m",
                                             key_ids=[str(uuid.uuid4())], wait_ms=600_000)),
        (stub.Holds, keyvault_pb2.HoldsRequest(sae_id="sae-s", master_sae_id="sae-m",
                                               key_ids=["1234"])),
        (stub.Void, keyvault_pb2.VoidRequest(key_ids=[str(uuid.uuid4())],
                                             initiator_sae_id="sae-m")),
        (stub.Void, keyvault_pb2.VoidRequest(key_ids=["x"], initiator_sae_id="sae-m",
                                             target_sae_ids=["sae-s"])),
        (stub.ListPending, keyvault_pb2.ListPendingRequest(limit=1_000_000)),
        (stub.Status, keyvault_pb2.StatusRequest(master_sae_id="#")),
    ]
    for method, request in requests:
        with pytest.raises(grpc.RpcError) as rpc:
            method(request, timeout=10)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert rpc.value.details(), request

    unknown = keyvault_pb2.TakeRequest(sae_id="sae-s", master_sae_id="sae-m",
                                       key_ids=[str(uuid.uuid4())])
    with pytest.raises(grpc.RpcError) as rpc:
        stub.Take(unknown, timeout=10)
    assert rpc.value.code() == grpc.StatusCode.NOT_FOUND
    assert _trailing(rpc.value)[ERROR_CODE_METADATA_KEY] == "KEY_NOT_FOUND"
    stub.Store(keyvault_pb2.StoreRequest(keys=[good]), timeout=10)
    with pytest.raises(grpc.RpcError) as rpc:
        stub.Take(keyvault_pb2.TakeRequest(sae_id="sae-t", master_sae_id="sae-m",
                                           key_ids=[good.key.key_id]), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
