"""Proto <-> domain checks of the KeyVault servicer (no process, no socket)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyvault.convert import grant_from_proto, outcome_to_acks, record_info_to_proto
from keyvault.records import RecordCipher, derive_db_key
from keyvault.service import KeyVaultService
from keyvault.store import RecordInfo, Vault, VoidOutcome
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import common_pb2, keyvault_pb2
from kme.types import SecretBytes

NOW = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
ROOT = SecretBytes(os.urandom(32))


def stored(**kw: Any) -> keyvault_pb2.StoredKey:
    key = kw.pop("key", common_pb2.KeyMaterial(key_id=str(uuid.uuid4()), value=b"\x07" * 32,
                                               size_bits=256))
    fields: dict[str, Any] = {"master_sae_id": "m", "allowed_sae_ids": ["s"],
                              "origin_node_id": "A"}
    fields.update(kw)
    return keyvault_pb2.StoredKey(key=key, **fields)


def error_of(msg: keyvault_pb2.StoredKey) -> str:
    with pytest.raises(KmstnError) as err:
        grant_from_proto(msg, "keys[0]", NOW, 60)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    return err.value.public


def test_defaults_and_times() -> None:
    rec = grant_from_proto(stored(), "keys[0]", NOW, 60)
    assert (rec.created_at, rec.expires_at) == (NOW, NOW + dt.timedelta(seconds=60))
    msg = stored()
    msg.created_at.FromDatetime(NOW - dt.timedelta(days=1))
    msg.expires_at.FromDatetime(NOW + dt.timedelta(days=1))
    rec = grant_from_proto(msg, "keys[0]", NOW, 60)
    assert rec.created_at == NOW - dt.timedelta(days=1)
    assert rec.expires_at == NOW + dt.timedelta(days=1)


def test_validation_names_the_field() -> None:
    km = common_pb2.KeyMaterial
    kid = str(uuid.uuid4())
    assert "keys[0].key.key_id" in error_of(stored(key=km(key_id=kid.upper()[:-1], value=b"\0",
                                                          size_bits=8)))
    assert "keys[0].key.size_bits" in error_of(stored(key=km(key_id=kid, value=b"",
                                                             size_bits=0)))
    assert "keys[0].key.size_bits" in error_of(stored(key=km(key_id=kid, value=b"\0" * 8193,
                                                             size_bits=65544)))
    assert "need 2" in error_of(stored(key=km(key_id=kid, value=b"\0", size_bits=9)))
    assert "pad bits" in error_of(stored(key=km(key_id=kid, value=b"\0\x01", size_bits=9)))
    assert "at least one SAE" in error_of(stored(allowed_sae_ids=[]))
    assert "listed twice" in error_of(stored(allowed_sae_ids=["s", "t", "s"]))
    assert "keys[0].allowed_sae_ids[1]" in error_of(stored(allowed_sae_ids=["s", "a b"]))
    assert "keys[0].master_sae_id" in error_of(stored(master_sae_id="x" * 65))
    assert "keys[0].origin_node_id" in error_of(stored(origin_node_id=""))
    past = stored()
    past.expires_at.FromDatetime(NOW - dt.timedelta(seconds=1))
    assert "in the past" in error_of(past)
    backwards = stored()
    backwards.created_at.FromDatetime(NOW + dt.timedelta(hours=2))
    backwards.expires_at.FromDatetime(NOW + dt.timedelta(hours=1))
    assert "after created_at" in error_of(backwards)
    # Upper-case UUIDs are the same key (RFC 9562 allows either case).
    rec = grant_from_proto(stored(key=km(key_id=kid.upper(), value=b"\0", size_bits=8)),
                           "keys[0]", NOW, 60)
    assert str(rec.key.key_id) == kid


@given(st.integers(min_value=1, max_value=2048), st.data())
def test_any_size_with_zero_pad_bits_round_trips(bits: int, data: st.DataObject) -> None:
    value = bytearray(data.draw(st.binary(min_size=(bits + 7) // 8, max_size=(bits + 7) // 8)))
    if bits % 8:
        value[-1] &= 0xFF << (8 - bits % 8) & 0xFF
    msg = stored(key=common_pb2.KeyMaterial(key_id=str(uuid.uuid4()), value=bytes(value),
                                            size_bits=bits))
    rec = grant_from_proto(msg, "keys[0]", NOW, 60)
    assert rec.key.material.reveal() == bytes(value) and rec.key.size_bits == bits


def test_acks_group_by_outcome() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    acks = outcome_to_acks(VoidOutcome((a, b), (), (c,)), "m", ["s", "t"])
    assert [(x.status, list(x.key_ids)) for x in acks] == [
        (common_pb2.ACK_STATUS_VOIDED, [str(a), str(b)]),
        (common_pb2.ACK_STATUS_KEY_NOT_PRESENT, [str(c)])]
    assert all(x.initiator_sae_id == "m" and list(x.target_sae_ids) == ["s", "t"] for x in acks)
    assert outcome_to_acks(VoidOutcome((), (), ()), "m", ["s"]) == []


def test_record_info_to_proto() -> None:
    info = RecordInfo(uuid.uuid4(), 256, "m", ("s", "t"), ("t",), "A", NOW,
                      NOW + dt.timedelta(seconds=1))
    msg = record_info_to_proto(info)
    assert (msg.key_id, list(msg.taken_by_sae_ids)) == (str(info.key_id), ["t"])
    assert msg.expires_at.ToDatetime(tzinfo=dt.UTC) == NOW + dt.timedelta(seconds=1)


class FakeContext:
    """The ServicerContext methods the servicer uses."""

    def __init__(self, remaining: float | None = 5.0, active: bool = True) -> None:
        self._remaining = remaining
        self._active = active

    def time_remaining(self) -> float | None:
        return self._remaining

    def is_active(self) -> bool:
        return self._active

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", "req-1"),)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[KeyVaultService]:
    vault = Vault.open(tmp_path / "v.db", derive_db_key(ROOT), RecordCipher.from_root(ROOT),
                       tombstone_ttl_s=60)
    yield KeyVaultService(vault, logging.getLogger("test"), key_ttl_s=60)
    vault.close()


def test_servicer_round_trip(service: KeyVaultService) -> None:
    ctx: Any = FakeContext()
    msg = stored(allowed_sae_ids=["s", "t"])
    assert service.Store(keyvault_pb2.StoreRequest(keys=[msg]), ctx).stored == 1
    kid = msg.key.key_id
    held = service.Holds(keyvault_pb2.HoldsRequest(sae_id="s", master_sae_id="m",
                                                   key_ids=[kid, kid]), ctx)
    assert list(held.key_ids) == [kid]
    status = service.Status(keyvault_pb2.StatusRequest(), ctx)
    assert [(p.master_sae_id, p.slave_sae_id, p.count) for p in status.pairs] == [
        ("m", "s", 1), ("m", "t", 1)]
    assert status.total_keys == 1
    got = service.Take(keyvault_pb2.TakeRequest(sae_id="t", master_sae_id="m", key_ids=[kid]),
                       ctx)
    assert [(k.key_id, k.value, k.size_bits) for k in got.keys] == [(kid, b"\x07" * 32, 256)]
    pending = service.ListPending(keyvault_pb2.ListPendingRequest(), ctx)
    assert [list(k.taken_by_sae_ids) for k in pending.keys] == [["t"]]
    acks = service.Void(keyvault_pb2.VoidRequest(key_ids=[kid], initiator_sae_id="m",
                                                 target_sae_ids=["s", "t"]), ctx).acks
    assert [a.status for a in acks] == [common_pb2.ACK_STATUS_FAILED_TO_VOID]


def test_servicer_takes_nothing_for_a_cancelled_call(service: KeyVaultService) -> None:
    msg = stored(allowed_sae_ids=["s"])
    service.Store(keyvault_pb2.StoreRequest(keys=[msg]), FakeContext())  # type: ignore[arg-type]
    req = keyvault_pb2.TakeRequest(sae_id="s", master_sae_id="m", key_ids=[msg.key.key_id])
    with pytest.raises(KmstnError) as err:
        service.Take(req, FakeContext(active=False))  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.TIMEOUT
    with pytest.raises(KmstnError) as err:
        service.Take(req, FakeContext(remaining=0.0))  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.TIMEOUT
    got = service.Take(req, FakeContext())  # type: ignore[arg-type]
    assert [k.value for k in got.keys] == [b"\x07" * 32]


def test_servicer_wait_is_bounded_by_the_deadline(service: KeyVaultService) -> None:
    # A 60 s wait with 0.1 s left on the caller's deadline answers in time.
    req = keyvault_pb2.TakeRequest(sae_id="s", master_sae_id="m", key_ids=[str(uuid.uuid4())],
                                   wait_ms=60_000)
    with pytest.raises(KmstnError) as err:
        service.Take(req, FakeContext(remaining=0.1))  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.KEY_NOT_FOUND
    req.wait_ms = 60_001
    with pytest.raises(KmstnError) as err:
        service.Take(req, FakeContext())  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and "wait_ms" in err.value.public


def job_msg(**kw: Any) -> keyvault_pb2.OutboxJob:
    fields: dict[str, Any] = {"job_id": str(uuid.uuid4()), "kind": "deliver",
                              "destination_node_id": "C", "payload": b"work"}
    fields.update(kw)
    msg = keyvault_pb2.OutboxJob(**fields)
    if "expires_at" not in kw:
        msg.expires_at.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    return msg


def test_servicer_reports_each_key_and_records_jobs(service: KeyVaultService) -> None:
    ctx: Any = FakeContext()
    a, b = stored(upstream_node_id="B"), stored(upstream_node_id="B")
    j = job_msg()
    first = service.Store(keyvault_pb2.StoreRequest(keys=[a, b], jobs=[j]), ctx)
    assert (first.stored, list(first.stored_key_ids)) == (2, [a.key.key_id, b.key.key_id])
    service.Take(keyvault_pb2.TakeRequest(sae_id="s", master_sae_id="m", key_ids=[b.key.key_id]),
                 ctx)
    again = service.Store(keyvault_pb2.StoreRequest(keys=[a, b], jobs=[j]), ctx)
    assert (again.stored, list(again.stored_key_ids)) == (0, [])
    assert list(again.already_held_key_ids) == [a.key.key_id]
    assert list(again.already_delivered_key_ids) == [b.key.key_id]
    due = service.ListDueJobs(keyvault_pb2.ListDueJobsRequest(), ctx)
    assert [(x.job_id, x.payload) for x in due.jobs] == [(j.job_id, b"work")]
    assert not due.HasField("next_due_at")
    resched = keyvault_pb2.RescheduleJobRequest(job_id=j.job_id)
    resched.next_due_at.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    assert service.RescheduleJob(resched, ctx).attempts == 1
    due = service.ListDueJobs(keyvault_pb2.ListDueJobsRequest(kind="deliver"), ctx)
    assert list(due.jobs) == [] and due.HasField("next_due_at")
    done = keyvault_pb2.CompleteJobRequest(job_id=j.job_id)
    assert service.CompleteJob(done, ctx).completed is True
    assert service.CompleteJob(done, ctx).completed is False
    assert service.RescheduleJob(resched, ctx).found is False


def test_servicer_void_by_a_neighbour(service: KeyVaultService) -> None:
    ctx: Any = FakeContext()
    theirs = stored(upstream_node_id="C")
    service.Store(keyvault_pb2.StoreRequest(keys=[theirs]), ctx)
    req = keyvault_pb2.VoidRequest(key_ids=[theirs.key.key_id], initiator_sae_id="m",
                                   target_sae_ids=["s"], upstream_node_id="B",
                                   jobs=[job_msg(kind="void")])
    with pytest.raises(KmstnError) as err:
        service.Void(req, ctx)
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    assert list(service.ListDueJobs(keyvault_pb2.ListDueJobsRequest(), ctx).jobs) == []
    req.upstream_node_id = "C"
    acks = service.Void(req, ctx).acks
    assert [a.status for a in acks] == [common_pb2.ACK_STATUS_VOIDED]
    assert len(service.ListDueJobs(keyvault_pb2.ListDueJobsRequest(), ctx).jobs) == 1


def test_servicer_outbox_validation_names_the_field(service: KeyVaultService) -> None:
    ctx: Any = FakeContext()
    past = job_msg()
    past.expires_at.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    cases: list[tuple[keyvault_pb2.OutboxJob, str]] = [
        (job_msg(job_id="nope"), "jobs[0].job_id"),
        (job_msg(kind="Deliver"), "jobs[0].kind"),
        (job_msg(kind=""), "jobs[0].kind"),
        (job_msg(destination_node_id="a/b"), "jobs[0].destination_node_id"),
        (job_msg(payload=b"\0" * (6 * 1024 * 1024 + 1)), "jobs[0].payload"),
        (keyvault_pb2.OutboxJob(job_id=str(uuid.uuid4()), kind="void",
                                destination_node_id="C"), "jobs[0].expires_at"),
        (past, "in the past"),
    ]
    for msg, named in cases:
        with pytest.raises(KmstnError) as err:
            service.PutJobs(keyvault_pb2.PutJobsRequest(jobs=[msg]), ctx)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT and named in err.value.public
    bad_requests: list[tuple[Any, Any, str]] = [
        (service.PutJobs, keyvault_pb2.PutJobsRequest(), "at least one"),
        (service.PutJobs, keyvault_pb2.PutJobsRequest(jobs=[job_msg() for _ in range(257)]),
         "at most 256"),
        (service.Store, keyvault_pb2.StoreRequest(keys=[stored()], jobs=[job_msg(kind="?")]),
         "jobs[0].kind"),
        (service.Store, keyvault_pb2.StoreRequest(keys=[stored(upstream_node_id="a b")]),
         "keys[0].upstream_node_id"),
        (service.Void, keyvault_pb2.VoidRequest(key_ids=[str(uuid.uuid4())],
                                                initiator_sae_id="m", target_sae_ids=["s"],
                                                upstream_node_id="#"), "upstream_node_id"),
        (service.CompleteJob, keyvault_pb2.CompleteJobRequest(job_id="x"), "job_id"),
        (service.RescheduleJob, keyvault_pb2.RescheduleJobRequest(job_id=str(uuid.uuid4())),
         "next_due_at"),
        (service.ListDueJobs, keyvault_pb2.ListDueJobsRequest(limit=1001), "limit"),
        (service.ListDueJobs, keyvault_pb2.ListDueJobsRequest(kind="A"), "kind"),
        (service.ListDueJobs, keyvault_pb2.ListDueJobsRequest(lease_ms=3_600_001), "lease_ms"),
    ]
    for method, request, named in bad_requests:
        with pytest.raises(KmstnError) as err:
            method(request, ctx)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT, named
        assert named in err.value.public, (named, err.value.public)
    # Nothing of the refused calls was recorded.
    assert list(service.ListDueJobs(keyvault_pb2.ListDueJobsRequest(), ctx).jobs) == []
    assert service.Status(keyvault_pb2.StatusRequest(), ctx).total_keys == 0
