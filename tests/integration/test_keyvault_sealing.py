"""Sealing the root secret with a real swtpm (started and stopped by keyvault.swtpm)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyvault.sealing import SEALED_FILE, obtain_root_secret
from keyvault.swtpm import SwtpmProcess
from kme.config import KeyvaultSettings
from kme.errors import ErrorCode, KmstnError
from tests.helpers import REPO

pytestmark = pytest.mark.integration

LOG = logging.getLogger("test.keyvault")


def test_seal_unseal_auth_and_foreign_tpm(short_tmp: Path) -> None:
    auth = short_tmp / "auth"
    auth.write_text("correct horse battery staple, but longer and random in production")
    settings = KeyvaultSettings(tpm="auto", tpm_device=short_tmp / "no-tpmrm0",
                                tpm_auth_file=auth)
    vault_dir = short_tmp / "vault"
    vault_dir.mkdir()
    first = obtain_root_secret(settings, vault_dir, LOG)
    assert (first.protection, first.created) == ("swtpm", True)
    meta = json.loads((vault_dir / SEALED_FILE).read_text())
    assert (meta["tpm"], meta["auth"]) == ("swtpm", True)
    assert first.secret.reveal().hex() not in json.dumps(meta)

    again = obtain_root_secret(settings, vault_dir, LOG)
    assert (again.secret, again.created) == (first.secret, False)

    # The wrong auth value: the TPM refuses, and we say which setting to check.
    auth.write_text("wrong")
    with pytest.raises(KmstnError) as err:
        obtain_root_secret(settings, vault_dir, LOG)
    assert err.value.code is ErrorCode.SEALED
    assert "refused the auth value" in err.value.public
    auth.write_text("correct horse battery staple, but longer and random in production")

    # The same sealed blob on another TPM (fresh emulator state) opens nothing.
    shutil.rmtree(vault_dir / "swtpm")
    with pytest.raises(KmstnError) as err:
        obtain_root_secret(settings, vault_dir, LOG)
    assert "cannot be opened by this TPM" in err.value.public


def test_swtpm_child_is_stopped_and_state_locked(short_tmp: Path) -> None:
    first = SwtpmProcess(short_tmp / "state", LOG)
    with first:
        assert first.socket_path is not None and first.socket_path.exists()
        # A second emulator on the same state directory must not start.
        with pytest.raises(KmstnError) as err:
            SwtpmProcess(short_tmp / "state", LOG).start()
        assert "in use by another swtpm" in err.value.public
        sock = first.socket_path
    assert not sock.exists()
    assert first.socket_path is None


def test_swtpm_dies_with_a_killed_parent(short_tmp: Path) -> None:
    """kill -9 of the service while it unseals leaves no emulator holding the state."""
    script = (
        "import logging, sys, time\n"
        "from pathlib import Path\n"
        "from keyvault.swtpm import SwtpmProcess\n"
        f"p = SwtpmProcess(Path({str(short_tmp / 'state')!r}), logging.getLogger('x'))\n"
        "p.start()\n"
        "print(p.pid, p.socket_path, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=REPO, text=True)
    sock: str | None = None
    try:
        assert parent.stdout is not None
        pid, sock = parent.stdout.readline().split()
        child = int(pid)
        os.kill(child, 0)  # the emulator runs
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(child):
            assert time.monotonic() < deadline, "swtpm outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        # The killed parent could not remove its private socket directory.
        if sock and Path(sock).parent.name.startswith("kmstn-swtpm-"):
            shutil.rmtree(Path(sock).parent, ignore_errors=True)
    # Its state directory is free again.
    with SwtpmProcess(short_tmp / "state", LOG) as again:
        assert again.pid is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by init) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
