"""A real keyvault process across restarts, kill -9, copied directories and sealing modes.

Every test runs ``python -m keyvault`` against a real swtpm (or a key file
or stdin where that is the point) and a real SQLCipher file.
"""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from keyvault.records import derive_db_key, derive_record_key
from kme.errors import ErrorCode, KmstnError
from kme.types import Key, SecretBytes
from tests.helpers import REPO, Pki, run_cli
from tests.integration.keyvault_harness import VaultNode, item, new_key

pytestmark = pytest.mark.integration


def test_restart_keeps_keys_partial_takes_and_tombstones(short_tmp: Path, pki: Pki) -> None:
    node = VaultNode(short_tmp, pki)
    try:
        node.start()
        c = node.client()
        plain, multi, gone = new_key(), new_key(), new_key()
        c.store([item(plain), item(multi, allowed=("sae-s", "sae-t")), item(gone)])
        assert c.take("sae-s", "sae-m", [multi.key_id, gone.key_id]) == [multi, gone]
        assert node.stop() == 0

        node.start()
        c = node.client()
        # A second process on the same vault refuses to start; the first serves on.
        second = run_cli(node.args, timeout=60)
        assert second.returncode == 1
        assert "another keyvault process is using" in second.stderr
        assert c.status("sae-m") == {("sae-m", "sae-s"): 1, ("sae-m", "sae-t"): 1}
        assert c.take("sae-s", "sae-m", [plain.key_id]) == [plain]
        assert c.take("sae-t", "sae-m", [multi.key_id]) == [multi]
        for key in (gone, multi):
            with pytest.raises(KmstnError) as err:
                c.take("sae-s", "sae-m", [key.key_id])
            assert err.value.code is ErrorCode.KEY_NOT_FOUND
        with pytest.raises(KmstnError) as err:
            c.store([item(gone)])
        assert err.value.code is ErrorCode.KEY_CONFLICT
        assert node.stop() == 0
    finally:
        node.close()
    logs = node.all_logs().decode()
    assert '"new_vault":true' in logs and '"new_vault":false' in logs
    assert "EMULATED TPM" in logs


def test_kill_9_under_load_loses_no_acknowledged_key_and_duplicates_none(
        short_tmp: Path, pki: Pki) -> None:
    node = VaultNode(short_tmp, pki)
    acked: dict[uuid.UUID, Key] = {}
    taken: dict[uuid.UUID, Key] = {}
    uncertain_stores: list[list[Key]] = []
    uncertain_takes: list[list[uuid.UUID]] = []
    anomalies: list[str] = []
    ready: queue.Queue[uuid.UUID] = queue.Queue()
    stop = threading.Event()

    def writer() -> None:
        c = node.client(timeout=5)
        while not stop.is_set():
            batch = [new_key() for _ in range(10)]
            try:
                c.store([item(k) for k in batch])
            except KmstnError:
                uncertain_stores.append(batch)  # in flight when the process died
                return
            for k in batch:
                acked[k.key_id] = k
                ready.put(k.key_id)

    def taker() -> None:
        c = node.client(timeout=5)
        while not stop.is_set():
            ids = []
            try:
                ids.append(ready.get(timeout=0.5))
                while len(ids) < 5:
                    ids.append(ready.get_nowait())
            except queue.Empty:
                if not ids:
                    continue
            try:
                got = c.take("sae-s", "sae-m", ids)
            except KmstnError as exc:
                if exc.code is ErrorCode.KEY_NOT_FOUND:
                    anomalies.append(f"acknowledged keys not found: {exc.public}")
                uncertain_takes.append(ids)
                return
            for k in got:
                if k != acked[k.key_id]:
                    anomalies.append(f"bytes differ for {k.key_id}")
                taken[k.key_id] = k

    try:
        node.start()
        threads = [threading.Thread(target=writer) for _ in range(2)]
        threads += [threading.Thread(target=taker) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(acked) < 600 or len(taken) < 200:
            assert time.monotonic() < deadline, "the load did not get going"
            assert all(t.is_alive() for t in threads), anomalies
            time.sleep(0.02)
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)  # in the middle of the load
        for t in threads[:2]:
            t.join(30)  # each writer ends on the call the kill cut off
        stop.set()
        for t in threads:
            t.join(30)
        assert anomalies == []
        assert len(uncertain_stores) == 2  # both writers were mid-load when it died
        node.kill()

        node.start()
        c = node.client()
        maybe_taken = {k for ids in uncertain_takes for k in ids}
        # No acknowledged key was lost: each one not (possibly) taken is still there.
        for key_id, key in acked.items():
            if key_id not in taken and key_id not in maybe_taken:
                assert c.take("sae-s", "sae-m", [key_id]) == [key], key_id
        # No key was handed out twice.
        for key_id in taken:
            assert c.holds("sae-s", "sae-m", [key_id]) == set()
            with pytest.raises(KmstnError) as err:
                c.take("sae-s", "sae-m", [key_id])
            assert err.value.code is ErrorCode.KEY_NOT_FOUND
        # A take cut off by the kill either committed (gone) or did not (all
        # still there): never half of its batch.
        for ids in uncertain_takes:
            held = c.holds("sae-s", "sae-m", ids)
            assert held in (set(), set(ids)), ids
            if held:
                assert c.take("sae-s", "sae-m", ids) == [acked[k] for k in ids]
        # A store cut off by the kill is all there, with the right bytes, or not at all.
        for batch in uncertain_stores:
            held = c.holds("sae-s", "sae-m", [k.key_id for k in batch])
            assert held in (set(), {k.key_id for k in batch})
            if held:
                assert c.take("sae-s", "sae-m", [k.key_id for k in batch]) == batch
        assert c.list_pending(10_000) == []
        assert node.stop() == 0
    finally:
        stop.set()
        node.close()


def test_copied_directory_on_a_fresh_tpm_fails_cleanly(short_tmp: Path, pki: Pki) -> None:
    original = VaultNode(short_tmp / "one", pki)
    key = new_key()
    try:
        original.start()
        original.client().store([item(key)])
        assert original.stop() == 0
        db = (original.vault_dir / "vault.db").read_bytes()
        assert not db.startswith(b"SQLite format 3")
        assert key.material.reveal() not in db

        # Another machine: the same files, but its own (fresh) TPM state.
        copy_dir = short_tmp / "copy"
        shutil.copytree(original.data_dir, copy_dir)
        shutil.rmtree(copy_dir / "keyvault" / "swtpm")
        shutil.rmtree(copy_dir / "run", ignore_errors=True)
        copied = VaultNode(short_tmp / "two", pki, data_dir=copy_dir)
        result = run_cli(copied.args, timeout=120)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "the sealed database key cannot be opened by this TPM" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert (copy_dir / "keyvault" / "swtpm" / "tpm2-00.permall").exists()  # a fresh TPM ran

        # The originals on their own TPM still open, so the blob itself was fine.
        original.start()
        assert original.client().take("sae-s", "sae-m", [key.key_id]) == [key]
        assert original.stop() == 0
    finally:
        original.close()


def _forms(secret: bytes) -> list[bytes]:
    return [
        secret, secret.hex().encode(), secret.hex().upper().encode(),
        base64.b64encode(secret), base64.urlsafe_b64encode(secret).rstrip(b"="),
        base64.b64encode(secret).rstrip(b"="),
    ]


def test_canary_key_bytes_and_tpm_auth_never_reach_logs_or_disk(short_tmp: Path,
                                                                pki: Pki) -> None:
    auth = b"canary-tpm-auth-" + os.urandom(8).hex().encode()
    auth_file = short_tmp / "tpm-auth"
    auth_file.write_bytes(auth + b"\n")
    node = VaultNode(short_tmp / "n", pki,
                     keyvault={"tpm": "swtpm", "tpm_auth_file": str(auth_file)})
    canary_taken = Key(uuid.uuid4(), SecretBytes(hashlib.sha256(b"kmstn canary 1").digest()), 256)
    canary_kept = Key(uuid.uuid4(), SecretBytes(hashlib.sha256(b"kmstn canary 2").digest()), 256)
    try:
        node.start()
        c = node.client()
        c.store([item(canary_taken), item(canary_kept)])
        c.store([item(canary_taken), item(canary_kept)])  # idempotent resend decrypts, too
        assert c.take("sae-s", "sae-m", [canary_taken.key_id]) == [canary_taken]
        with pytest.raises(KmstnError):
            c.take("sae-s", "sae-m", [canary_taken.key_id])
        c.void([canary_kept.key_id], "sae-m", ["sae-t"])  # not present for that set
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)  # leave the WAL as it is
        node.kill()
        files = {p: p.read_bytes() for p in node.data_files()}
        node.start()  # the sealed key opens again with the same auth
        assert node.client().take("sae-s", "sae-m", [canary_kept.key_id]) == [canary_kept]
        assert node.stop() == 0
    finally:
        node.close()
    db = files[node.vault_dir / "vault.db"]
    assert db and not db.startswith(b"SQLite format 3")
    assert any(p.name == "vault.db-wal" and data for p, data in files.items())
    logs = node.all_logs()
    assert b"keys taken" in logs  # the logs are there, and mention the key IDs
    assert str(canary_taken.key_id).encode() in logs
    secrets = [canary_taken.material.reveal(), canary_kept.material.reveal(), auth,
               hashlib.sha256(auth).digest()]
    for secret in secrets:
        for form in _forms(secret):
            assert form not in logs
            for path, data in files.items():
                assert form not in data, path


def test_key_from_file_and_stdin(short_tmp: Path, pki: Pki) -> None:
    root_key = bytes(range(32))
    key_file = short_tmp / "vault.key"
    key_file.write_text(root_key.hex() + "\n")
    key_file.chmod(0o600)
    node = VaultNode(short_tmp / "f", pki, keyvault={"tpm": "file", "key_file": str(key_file)})
    key = new_key()
    try:
        node.start()
        node.client().store([item(key)])
        assert node.stop() == 0
    finally:
        node.close()
    logs = node.all_logs()
    assert b"SECURITY WARNING" in logs and b"key file" in logs
    root = SecretBytes(root_key)
    for secret in (root_key, derive_db_key(root).reveal(), derive_record_key(root, 1).reveal()):
        for form in _forms(secret):
            assert form not in logs
    assert not (node.vault_dir / "swtpm").exists()

    # The same vault from stdin.
    stdin_node = VaultNode(short_tmp / "s", pki, keyvault={"tpm": "stdin"},
                           data_dir=node.data_dir)
    proc = subprocess.Popen([sys.executable, *stdin_node.args], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdin is not None
        proc.stdin.write(root_key.hex().encode() + b"\n")
        proc.stdin.close()
        client = stdin_node.client()
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                assert client.take("sae-s", "sae-m", [key.key_id]) == [key]
                break
            except KmstnError as exc:
                # Not listening yet: the call waited for it until its deadline.
                assert exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT)
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        stdin_node.close()

    # A wrong key does not open the vault: a clear message, no traceback.
    key_file.write_text(bytes(32).hex())
    result = run_cli(node.args, timeout=60)
    assert result.returncode == 1
    assert "the database key does not open" in result.stderr
    assert "Traceback" not in result.stderr
    # A vault whose key comes from a file cannot be opened "by a TPM" by mistake.
    tpm_node = VaultNode(short_tmp / "t", pki, keyvault={"tpm": "swtpm"},
                         data_dir=node.data_dir)
    result = run_cli(tpm_node.args, timeout=60)
    assert result.returncode == 1
    assert 'set keyvault.tpm to "file" or "stdin"' in result.stderr


def test_bad_keyvault_config_exits_78(short_tmp: Path, pki: Pki) -> None:
    node = VaultNode(short_tmp / "a", pki,
                     keyvault={"tpm": "swtpm", "tpm_auth_file": str(short_tmp / "missing")})
    result = run_cli(node.args)
    assert result.returncode == 78
    assert "keyvault.tpm_auth_file: file not found" in result.stderr
    bad_key = short_tmp / "bad.key"
    bad_key.write_text("not hex")
    node = VaultNode(short_tmp / "b", pki, keyvault={"tpm": "file", "key_file": str(bad_key)})
    result = run_cli(node.args)
    assert result.returncode == 78
    assert "keyvault.key_file: must be 64 hex characters" in result.stderr
    assert "not hex" not in result.stderr  # the content of a key file is never echoed
