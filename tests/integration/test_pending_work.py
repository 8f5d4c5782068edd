"""Issue 10: pending work survives kill -9 of the relay that owns it.

On the line W =QKD= X --PQC-- Y =QKD= Z, a delivery (concurrent mode) or a
void (confirmed mode) that cannot get through is recorded in W's keyvault;
W's relay is then killed with SIGKILL and started again, the path comes
back, and the work completes: the slave gets its key, the void reaches Z,
and W's outbox ends empty. Work kept only in memory would be lost here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from keyvault.client import KeyVaultClient
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, KeyGrant, SecretBytes
from lab.saeclient import SaeClient
from tests.federation import line_topology
from tests.helpers import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(os.path.realpath(tempfile.mkdtemp(prefix="kmpw-", dir="/tmp")))
    yield path
    run_cli(["-m", "lab", "federation", "down", "--state", str(path / "state")])
    if not os.environ.get("KMSTN_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


def _up(root: Path, first_host: int, delivery: str) -> Path:
    state = root / "state"
    up = run_cli(["-m", "lab", "federation", "up", "--topology",
                  str(line_topology(root, first_host)), "--state", str(state),
                  "--delivery", delivery], timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    return state


def _kill(state: Path, service: str) -> None:
    pids = json.loads((state / "pids.json").read_text())
    os.killpg(pids[service]["pgid"], signal.SIGKILL)


def _restart(state: Path, service: str, kill: bool = False) -> None:
    out = run_cli(["-m", "lab", "federation", "restart", "--state", str(state), service,
                   *(["--kill"] if kill else [])], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _vault(state: Path, node: str) -> KeyVaultClient:
    return KeyVaultClient(grpc.insecure_channel(f"unix:{state}/run/{node}/keyvault.sock"))


def _recorded(vault: KeyVaultClient, kind: str) -> None:
    """Wait until W's outbox holds a job of ``kind`` (due now, or due later after a
    failed attempt)."""
    deadline = time.monotonic() + 30
    while True:
        found = vault.due_jobs(100, kind=kind)
        if found.jobs or found.next_due_at is not None:
            return
        assert time.monotonic() < deadline, f"no {kind} job was recorded"
        time.sleep(0.1)


def _logged_key_ids(state: Path, service_log: str, message: str) -> list[str]:
    ids: list[str] = []
    for line in (state / "logs" / service_log).read_text().splitlines():
        record = json.loads(line)
        if record.get("msg") == message:
            ids += record["key_ids"]
    return ids


def _outbox_empties(vault: KeyVaultClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = vault.due_jobs(100)
        if not found.jobs and found.next_due_at is None:
            return
        assert time.monotonic() < deadline, f"work still pending: {found}"
        time.sleep(0.5)


def test_a_concurrent_delivery_pending_at_kill_9_completes_after_restart(root: Path) -> None:
    state = _up(root, 101, "concurrent")
    manifest = json.loads((state / "federation.json").read_text())
    master = SaeClient.from_manifest(manifest, "sae-w")
    slave = SaeClient.from_manifest(manifest, "sae-z")
    status, body = master.enc_keys("sae-z")
    assert status == 200, body
    assert slave.dec_keys("sae-w", [body["keys"][0]["key_ID"]])[0] == 200  # warm path

    _kill(state, "Y/gateway020")  # the path to Z is cut at Y
    status, body = master.enc_keys("sae-z")
    assert status == 200, body  # concurrent mode: the master has its key at once
    key = body["keys"][0]
    w = _vault(state, "W")
    _recorded(w, "deliver")

    _restart(state, "W/relay", kill=True)  # kill -9 of the relay that owned the delivery
    _restart(state, "Y/gateway020")  # the path is back
    deadline = time.monotonic() + 120
    while True:
        status, got = slave.dec_keys("sae-w", [key["key_ID"]])
        if status == 200:
            break
        assert time.monotonic() < deadline, got
        time.sleep(1)
    assert got["keys"] == [key]
    _outbox_empties(w)
    master.close()
    slave.close()


def test_a_void_pending_at_kill_9_reaches_its_node_after_restart(root: Path) -> None:
    state = _up(root, 105, "confirmed")
    manifest = json.loads((state / "federation.json").read_text())
    master = SaeClient.from_manifest(manifest, "sae-w")
    status, body = master.enc_keys("sae-z")
    assert status == 200, body  # warm path

    _kill(state, "Z/gateway020")
    status, body = master.enc_keys("sae-z")
    assert status == 503, body  # confirmed mode: Z did not acknowledge
    w = _vault(state, "W")
    _recorded(w, "void")
    key_ids = _logged_key_ids(state, "W-relay.log", "keys voided after a failed delivery")
    assert len(key_ids) == 1

    _restart(state, "W/relay", kill=True)
    _restart(state, "Z/gateway020")
    _outbox_empties(w)
    # The void reached Z: the key ID is tombstoned there, so a copy of it
    # arriving late (or ever) is refused.
    late = KeyGrant(Key(uuid.UUID(key_ids[0]), SecretBytes(secrets.token_bytes(32)), 256),
                    "sae-w", ("sae-z",), "W", "Y")
    with pytest.raises(KmstnError) as err:
        _vault(state, "Z").store_keys([late])
    assert err.value.code is ErrorCode.KEY_CONFLICT
    master.close()
