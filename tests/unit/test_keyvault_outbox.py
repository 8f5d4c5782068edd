"""The outbox (issue 10: pending work survives restarts) on real SQLCipher files."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlcipher3

from keyvault.records import RecordCipher, derive_db_key
from keyvault.store import Sweeper, Vault
from kme.errors import ErrorCode, KmstnError
from kme.types import OutboxJob, SecretBytes
from tests.unit.vaultkit import ROOT, T0, Clock, at, code_of, job, key, open_vault, rec


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


def raw(path: Path) -> Any:
    conn = sqlcipher3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA key = \"x'{derive_db_key(ROOT).reveal().hex()}'\"")
    return conn


def ids(jobs: tuple[OutboxJob, ...]) -> list[uuid.UUID]:
    return [j.job_id for j in jobs]


def test_put_list_complete_reschedule(vault: Vault, clock: Clock) -> None:
    first, second, later = job(payload=b"one"), job(kind="void", payload=b"two"), job(due=60)
    assert vault.put_jobs([first]) == 1
    clock.now = T0 + 1
    assert vault.put_jobs([second, later]) == 2
    due = vault.due_jobs(10)
    # Oldest first; the later job is not due, and is the next one.
    assert ids(due.jobs) == [first.job_id, second.job_id]
    assert due.next_due_at == at(60)
    got = due.jobs[0]
    assert (got.kind, got.destination_node_id, got.payload, got.attempts) == (
        "deliver", "C", SecretBytes(b"one"), 0)
    assert (got.created_at, got.next_due_at, got.expires_at) == (at(0), at(0), at(3600))
    assert ids(vault.due_jobs(10, kind="void").jobs) == [second.job_id]
    # Beyond the limit, the next due time is "already".
    assert vault.due_jobs(1).next_due_at == at(1)

    assert vault.reschedule_job(first.job_id, at(30)) == 1
    assert vault.reschedule_job(first.job_id, at(40)) == 2
    assert ids(vault.due_jobs(10).jobs) == [second.job_id]
    assert vault.complete_job(second.job_id) is True
    assert vault.complete_job(second.job_id) is False
    assert vault.reschedule_job(second.job_id, at(40)) is None
    clock.now = T0 + 40
    again = vault.due_jobs(10)
    assert ids(again.jobs) == [first.job_id] and again.jobs[0].attempts == 2
    assert again.next_due_at == at(60)
    assert vault.due_jobs(10).jobs == again.jobs  # listing alone changes nothing


def test_a_lease_hides_listed_jobs_until_it_ends(vault: Vault, clock: Clock) -> None:
    a, b = job(), job()
    vault.put_jobs([a, b])
    leased = vault.due_jobs(1, lease_s=30)
    assert ids(leased.jobs) == [a.job_id]
    assert ids(vault.due_jobs(10).jobs) == [b.job_id]
    clock.now = T0 + 30
    assert ids(vault.due_jobs(10).jobs) == [a.job_id, b.job_id]
    assert vault.due_jobs(10).jobs[0].attempts == 0  # a lease is not a failed attempt


def test_put_is_idempotent_and_a_reused_id_conflicts(vault: Vault, path: Path) -> None:
    j = job(payload=b"work")
    assert vault.put_jobs([j]) == 1
    assert vault.put_jobs([j]) == 0
    fresh = job()
    for other in (job(job_id=j.job_id, payload=b"else"), job(job_id=j.job_id, kind="void"),
                  job(job_id=j.job_id, destination="D"), job(job_id=j.job_id, ttl=7200)):
        with pytest.raises(KmstnError) as err:
            vault.put_jobs([fresh, other])
        assert err.value.code is ErrorCode.KEY_CONFLICT
    assert code_of(vault.put_jobs, [fresh, fresh]) is ErrorCode.INVALID_ARGUMENT
    # Nothing of the refused batches was recorded.
    assert ids(vault.due_jobs(10).jobs) == [j.job_id]
    assert vault.due_jobs(10).jobs[0].payload == SecretBytes(b"work")


def test_store_and_job_commit_together_or_not_at_all(vault: Vault) -> None:
    k, deliver = key(), job(payload=b"deliver k")
    outcome = vault.store_keys([rec(k)], [deliver])
    assert outcome.stored == (k.key_id,)
    assert ids(vault.due_jobs(10).jobs) == [deliver.job_id]
    # A store that conflicts records no job ...
    clash = job()
    conflicting = rec(k, allowed=("s", "t"))
    assert code_of(vault.store_keys, [conflicting], [clash]) is ErrorCode.KEY_CONFLICT
    assert ids(vault.due_jobs(10).jobs) == [deliver.job_id]
    # ... and a job that conflicts stores no key.
    other = key()
    bad_job = job(job_id=deliver.job_id, payload=b"other work")
    assert code_of(vault.store_keys, [rec(other)], [bad_job]) is ErrorCode.KEY_CONFLICT
    assert vault.holds("s", "m", [other.key_id]) == set()
    # A resent store with its job (the answer was lost) records both once.
    again = vault.store_keys([rec(k)], [deliver])
    assert again.already_held == (k.key_id,)
    assert ids(vault.due_jobs(10).jobs) == [deliver.job_id]


def test_a_void_and_its_job_commit_together(vault: Vault) -> None:
    k, pass_on = key(), job(kind="void")
    vault.store([rec(k)])
    assert vault.void([k.key_id], "m", ["s"], jobs=[pass_on]).voided == (k.key_id,)
    assert ids(vault.due_jobs(10).jobs) == [pass_on.job_id]


def test_jobs_and_payloads_survive_reopening(path: Path, clock: Clock) -> None:
    payloads = [os.urandom(n) for n in (0, 1, 1000, 200_000)]
    jobs = [job(payload=p) for p in payloads]
    v = open_vault(path, clock)
    v.put_jobs(jobs)
    v.reschedule_job(jobs[1].job_id, at(0))
    v.close()
    v = open_vault(path, clock)
    due = v.due_jobs(10)
    v.close()
    assert [(j.job_id, j.payload.reveal(), j.attempts) for j in due.jobs] == [
        (j.job_id, p, 1 if i == 1 else 0) for i, (j, p) in enumerate(zip(jobs, payloads,
                                                                          strict=True))]


def test_payloads_are_sealed_and_bound_to_their_job(vault: Vault, path: Path) -> None:
    canary = b"outbox-canary-" + os.urandom(16).hex().encode()
    a, b = job(payload=canary), job(payload=b"b")
    vault.put_jobs([a, b])
    conn = raw(path)
    blob = conn.execute("SELECT payload FROM jobs WHERE job_id = ?", (str(a.job_id),)).fetchone()
    assert canary not in bytes(blob[0])
    # A payload copied into another job's row does not decrypt ...
    conn.execute("UPDATE jobs SET payload = ? WHERE job_id = ?", (blob[0], str(b.job_id)))
    with pytest.raises(KmstnError) as err:
        vault.due_jobs(10)
    assert err.value.code is ErrorCode.INTERNAL and err.value.cause is not None
    assert str(b.job_id) in err.value.cause
    # ... nor does a job whose destination was edited.
    conn.execute("DELETE FROM jobs WHERE job_id = ?", (str(b.job_id),))
    conn.execute("UPDATE jobs SET destination = 'D' WHERE job_id = ?", (str(a.job_id),))
    assert code_of(vault.due_jobs, 10) is ErrorCode.INTERNAL
    conn.close()
    vault.close()
    assert canary not in path.read_bytes()


def test_expired_jobs_are_never_listed_and_the_sweep_deletes_them(vault: Vault,
                                                                  clock: Clock) -> None:
    short, long = job(ttl=10), job(ttl=100)
    vault.put_jobs([short, long])
    swept = vault.expire()
    assert swept.jobs == [] and swept.next_us == int((T0 + 10) * 1e6)
    clock.now = T0 + 10
    assert ids(vault.due_jobs(10).jobs) == [long.job_id]  # due, but not swept yet
    assert vault.reschedule_job(short.job_id, at(20)) is None
    swept = vault.expire()
    assert [(j.job_id, j.kind, j.destination_node_id) for j in swept.jobs] == [
        (short.job_id, "deliver", "C")]
    assert swept.next_us == int((T0 + 100) * 1e6)
    assert vault.complete_job(short.job_id) is False


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_sweeper_thread_drops_expired_jobs_and_logs_them(tmp_path: Path) -> None:
    import datetime as dt

    v = Vault.open(tmp_path / "vault.db", derive_db_key(ROOT), RecordCipher.from_root(ROOT),
                   tombstone_ttl_s=3600)
    log = logging.getLogger("test.outbox.sweeper")
    handler = _Records()
    log.addHandler(handler)
    sweeper = Sweeper(v, log)
    sweeper.start()
    try:
        now = dt.datetime.now(dt.UTC)
        keep = OutboxJob(uuid.uuid4(), "void", "B", SecretBytes(b"k"),
                         expires_at=now + dt.timedelta(hours=1))
        drop = OutboxJob(uuid.uuid4(), "deliver", "C", SecretBytes(b"d"),
                         expires_at=now + dt.timedelta(seconds=0.3))
        # The sweeper sleeps until the hour-long job; the second put must wake it.
        v.put_jobs([keep])
        v.put_jobs([drop])
        deadline = time.monotonic() + 30
        while not any(r.getMessage() == "outbox jobs expired" for r in handler.records):
            assert time.monotonic() < deadline, "the sweeper did not drop the job"
            time.sleep(0.05)
        record = next(r for r in handler.records if r.getMessage() == "outbox jobs expired")
        assert record.levelno == logging.WARNING
        assert record.__dict__["jobs"] == [{"job_id": str(drop.job_id), "kind": "deliver",
                                            "destination": "C", "attempts": 0}]
        assert ids(v.due_jobs(10).jobs) == [keep.job_id]
    finally:
        sweeper.stop()
        log.removeHandler(handler)
        v.close()


def test_a_listing_stops_at_8_mib_of_payloads(vault: Vault) -> None:
    """One answer must fit in a gRPC message (16 MiB): large jobs come a page at a time."""
    big = [job(payload=bytes([n]) * (3 * 1024 * 1024)) for n in range(4)]
    vault.put_jobs(big[:2])
    vault.put_jobs(big[2:])
    first = vault.due_jobs(10, lease_s=60)
    assert ids(first.jobs) == [big[0].job_id, big[1].job_id]
    assert first.next_due_at == at(0)  # more are due already
    second = vault.due_jobs(10, lease_s=60)
    assert ids(second.jobs) == [big[2].job_id, big[3].job_id]
    assert [j.payload for j in second.jobs] == [b.payload for b in big[2:]]
    huge = job(payload=b"\1" * (9 * 1024 * 1024))
    vault.put_jobs([huge])
    assert ids(vault.due_jobs(10).jobs) == [huge.job_id]  # alone over the cap: still listed
