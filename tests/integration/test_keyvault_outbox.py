"""The outbox and the issue-16 rules through a real ``python -m keyvault`` (real swtpm).

The typed client (keyvault.client) against a real process: jobs recorded
with keys and alone survive kill -9 with their payloads intact; a
neighbour's void and an identical resend behave as in the unit tests.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from keyvault.client import KeyVaultClient
from kme.errors import ErrorCode, KmstnError
from kme.types import OutboxJob, SecretBytes
from tests.helpers import Pki
from tests.integration.keyvault_harness import VaultNode, item, new_key

pytestmark = pytest.mark.integration


def _job(kind: str = "deliver", destination: str = "B", payload: bytes | None = None,
         due_in_s: float | None = None) -> OutboxJob:
    now = dt.datetime.now(dt.UTC)
    return OutboxJob(uuid.uuid4(), kind, destination,
                     SecretBytes(os.urandom(64) if payload is None else payload),
                     expires_at=now + dt.timedelta(hours=1),
                     next_due_at=None if due_in_s is None else now + dt.timedelta(
                         seconds=due_in_s))


def _all_due(c: KeyVaultClient) -> dict[uuid.UUID, OutboxJob]:
    return {j.job_id: j for j in c.due_jobs(1000).jobs}


def test_jobs_survive_kill_9_with_their_payloads(short_tmp: Path, pki: Pki) -> None:
    node = VaultNode(short_tmp, pki)
    canary = b"outbox-canary-" + os.urandom(16).hex().encode()
    acked: dict[uuid.UUID, OutboxJob] = {}
    uncertain: list[OutboxJob] = []
    stop = threading.Event()

    def writer() -> None:
        c = node.client(timeout=5)
        while not stop.is_set():
            j = _job(payload=os.urandom(300))
            try:
                c.put_jobs([j])
            except KmstnError:
                uncertain.append(j)  # in flight when the process died
                return
            acked[j.job_id] = j

    try:
        node.start()
        c = node.client()
        key = new_key()
        with_keys = _job(payload=canary + b" and a key")
        assert c.store_keys([item(key)], [with_keys]).stored == (key.key_id,)
        later = _job(kind="void", due_in_s=3600 - 1)
        failed, done = _job(), _job()
        assert c.put_jobs([later, failed, done]) == 3
        assert c.reschedule_job(failed.job_id, dt.datetime.now(dt.UTC)) == 1
        assert c.complete_job(done.job_id) is True

        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + 120
        while len(acked) < 100:
            assert time.monotonic() < deadline, "the load did not get going"
            assert thread.is_alive()
            time.sleep(0.02)
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)  # in the middle of the puts
        thread.join(30)
        stop.set()
        assert len(uncertain) == 1
        node.kill()

        node.start()
        c = node.client()
        due = _all_due(c)
        # Every acknowledged job is due again, byte for byte; the one cut off
        # by the kill is there whole or not at all.
        for job_id, j in acked.items():
            assert due[job_id].payload == j.payload
            assert (due[job_id].kind, due[job_id].destination_node_id) == ("deliver", "B")
        assert uncertain[0].job_id not in due or (
            due[uncertain[0].job_id].payload == uncertain[0].payload)
        assert due[with_keys.job_id].payload == SecretBytes(canary + b" and a key")
        assert due[failed.job_id].attempts == 1
        assert done.job_id not in due and later.job_id not in due
        # Everything else done, the later job is what falls due next.
        for job_id in due:
            assert c.complete_job(job_id) is True
        rest = c.due_jobs(10)
        assert rest.jobs == () and rest.next_due_at == later.next_due_at
        assert c.take("sae-s", "sae-m", [key.key_id]) == [key]
        assert node.stop() == 0
    finally:
        stop.set()
        node.close()
    # The payloads were encrypted at rest and never logged.
    assert canary not in node.all_logs()
    for path in node.data_files():
        assert canary not in path.read_bytes(), path


def test_a_lease_and_the_issue_16_rules_over_grpc(short_tmp: Path, pki: Pki) -> None:
    node = VaultNode(short_tmp, pki)
    try:
        node.start()
        c = node.client()
        a, b = _job(), _job()
        c.put_jobs([a, b])
        assert c.put_jobs([a]) == 0  # a retried put
        assert [j.job_id for j in c.due_jobs(1, lease_ms=60_000).jobs] == [a.job_id]
        assert [j.job_id for j in c.due_jobs(10, kind="deliver").jobs] == [b.job_id]
        with pytest.raises(KmstnError) as err:
            c.put_jobs([OutboxJob(a.job_id, "void", "B", SecretBytes(b"x"), a.expires_at)])
        assert err.value.code is ErrorCode.KEY_CONFLICT

        from_b, from_c = new_key(), new_key()
        c.store_keys([item(from_b, upstream_node_id="B"), item(from_c, upstream_node_id="C")])
        with pytest.raises(KmstnError) as err:
            c.void_keys([from_b.key_id, from_c.key_id], "sae-m", ["sae-s"],
                        upstream_node_id="B", jobs=[_job(kind="void")])
        assert err.value.code is ErrorCode.PERMISSION_DENIED
        assert c.holds("sae-s", "sae-m", [from_b.key_id, from_c.key_id]) == {
            from_b.key_id, from_c.key_id}
        assert len(c.due_jobs(10).jobs) == 1  # the refused void recorded no job
        out = c.void_keys([from_b.key_id], "sae-m", ["sae-s"], upstream_node_id="B")
        assert (out.voided, out.failed_to_void, out.not_present) == ((from_b.key_id,), (), ())

        # An identical resend after the slave took the key is success.
        assert c.take("sae-s", "sae-m", [from_c.key_id]) == [from_c]
        again = c.store_keys([item(from_c, upstream_node_id="C")])
        assert again.already_delivered == (from_c.key_id,) and again.stored == ()
        with pytest.raises(KmstnError) as err:
            c.store_keys([item(from_c, upstream_node_id="B")])
        assert err.value.code is ErrorCode.KEY_CONFLICT
        assert node.stop() == 0
    finally:
        node.close()
    logs = node.all_logs().decode()
    assert '"msg":"void refused"' in logs and '"upstream_node_id":"B"' in logs
