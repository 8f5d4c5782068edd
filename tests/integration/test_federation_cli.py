"""Issue 7 acceptance: the real launcher, over the `kmstn` command line.

federation up / keys over 3 hops / status / down, and nothing left running;
a failed start names the service and its log and leaves nothing behind;
the systemd units verify.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyvault.client import KeyVaultClient
from lab.federation import group_alive
from lab.saeclient import SaeClient
from tests.federation import line_topology
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.integration


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd and "pytest" not in cmd:
            found.append(f"{pid}: {cmd[:120]}")
    return found


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(os.path.realpath(tempfile.mkdtemp(prefix="kmcli-", dir="/tmp")))
    yield path
    run_cli(["-m", "lab", "federation", "down", "--state", str(path / "state")])
    shutil.rmtree(path, ignore_errors=True)


def test_up_keys_over_three_hops_status_down(root: Path) -> None:
    topology = line_topology(root, 61)
    state = root / "state"
    up = run_cli(["-m", "lab", "federation", "up", "--topology", str(topology),
                  "--state", str(state)], timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    manifest = json.loads((state / "federation.json").read_text())
    assert Path(manifest["ca"]).is_absolute() and Path(manifest["ca"]).exists()
    assert {k["id"] for k in manifest["kmstns"]} == set("WXYZ")
    for k in manifest["kmstns"]:
        assert k["etsi014_url"].startswith("https://127.0.0.")
        assert k["etsi020_url"].startswith("https://127.0.0.")
    for s in manifest["saes"]:
        assert set(s) == {"id", "kmstn", "cert", "key"}
        assert Path(s["cert"]).is_absolute() and Path(s["key"]).exists()

    got = run_cli(["-m", "lab", "sae", "get-key", "--state", str(state), "--sae", "sae-w",
                   "--slave", "sae-z", "--number", "2"])
    assert got.returncode == 0, got.stdout + got.stderr
    keys = json.loads(got.stdout)["keys"]
    ids = [k["key_ID"] for k in keys]
    back = run_cli(["-m", "lab", "sae", "get-key-with-ids", "--state", str(state), "--sae",
                    "sae-z", "--master", "sae-w", *ids])
    assert back.returncode == 0, back.stdout + back.stderr
    assert json.loads(back.stdout)["keys"] == keys  # identical IDs and bytes, 3 hops away
    again = run_cli(["-m", "lab", "sae", "get-key-with-ids", "--state", str(state), "--sae",
                     "sae-z", "--master", "sae-w", ids[0]])
    assert again.returncode == 1  # delivered once

    status = run_cli(["-m", "lab", "federation", "status", "--state", str(state)])
    assert status.returncode == 0, status.stderr
    for node in "WXYZ":
        assert f"\n{node} " in status.stdout
    assert "DOWN" not in status.stdout
    assert "QKD-W-X" in status.stdout and "PQC-X-Y" in status.stdout

    pids = json.loads((state / "pids.json").read_text())
    assert len(pids) == 4 * 5 + 2  # five services per KMSTN, one emulator per QKD link
    down = run_cli(["-m", "lab", "federation", "down", "--state", str(state)], timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "nothing left running" in down.stdout
    for name, info in pids.items():
        assert not group_alive(info["pgid"]), f"{name} is still running"
    assert _processes_mentioning(str(state)) == []
    assert not (state / "pids.json").exists()
    # Every service stopped on SIGTERM through its own shutdown, not a kill.
    logs = sorted((state / "logs").glob("*.log"))
    assert len(logs) == len(pids)
    for log in logs:
        last = json.loads(log.read_text().splitlines()[-1])
        assert last["msg"] == "stopped", f"{log.name}: {last}"


def _exchange(state: Path, master: str, slave: str) -> str:
    """enc_keys at the master, dec_keys at the slave: identical bytes; returns the key ID."""
    manifest = json.loads((state / "federation.json").read_text())
    m, s = SaeClient.from_manifest(manifest, master), SaeClient.from_manifest(manifest, slave)
    try:
        status, body = m.enc_keys(slave)
        assert status == 200, body
        key = body["keys"][0]
        status, got = s.dec_keys(master, [key["key_ID"]])
        assert status == 200, got
        assert got["keys"] == [key]
        return str(key["key_ID"])
    finally:
        m.close()
        s.close()


def test_exchanges_recover_when_services_restart(root: Path) -> None:
    """Kill or stop any one service on a 3-hop path and start it again: the next
    exchange works at once, and a key stored before its keyvault was killed survives."""
    state = root / "state"
    up = run_cli(["-m", "lab", "federation", "up", "--topology", str(line_topology(root, 71)),
                  "--state", str(state)], timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    _exchange(state, "sae-w", "sae-z")  # every pool, reservation and connection in use
    for service, kill in (("X/relay", True), ("Y/relay", False), ("W/relay", True),
                          ("W/gateway014", True), ("Z/gateway014", False),
                          ("X/gateway020", True), ("Y/routing", True), ("W/routing", False),
                          ("QKD-Y-Z/qkdsim", True), ("W/keyvault", False)):
        restart = run_cli(["-m", "lab", "federation", "restart", "--state", str(state),
                           service, *(["--kill"] if kill else [])], timeout=120)
        assert restart.returncode == 0, restart.stdout + restart.stderr
        _exchange(state, "sae-w", "sae-z")
        _exchange(state, "sae-z", "sae-w")

    # A key the master holds (confirmed: Z stored it) outlives kill -9 of Z's keyvault.
    manifest = json.loads((state / "federation.json").read_text())
    w = SaeClient.from_manifest(manifest, "sae-w")
    status, body = w.enc_keys("sae-z")
    w.close()
    assert status == 200, body
    restart = run_cli(["-m", "lab", "federation", "restart", "--state", str(state),
                       "Z/keyvault", "--kill"], timeout=120)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    z = SaeClient.from_manifest(manifest, "sae-z")
    status, got = z.dec_keys("sae-w", [body["keys"][0]["key_ID"]])
    z.close()
    assert (status, got.get("keys")) == (200, body["keys"])

    unknown = run_cli(["-m", "lab", "federation", "restart", "--state", str(state), "Q/relay"])
    assert unknown.returncode == 1 and "no such service" in unknown.stderr
    pids = json.loads((state / "pids.json").read_text())
    down = run_cli(["-m", "lab", "federation", "down", "--state", str(state)], timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(not group_alive(info["pgid"]) for info in pids.values())
    assert _processes_mentioning(str(state)) == []


def test_under_restarts_each_key_a_master_got_is_delivered_once_and_none_is_left(
        root: Path) -> None:
    """Three masters request keys without pause while services on the path are killed
    and restarted: some requests fail (503), but every key a master got is delivered
    once, with its bytes, and every copy of a failed request is voided in the end."""
    state = root / "state"
    up = run_cli(["-m", "lab", "federation", "up", "--topology", str(line_topology(root, 75)),
                  "--state", str(state)], timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    manifest = json.loads((state / "federation.json").read_text())
    got: list[dict[str, Any]] = []
    statuses: list[int] = []
    stop = threading.Event()

    def master() -> None:
        client = SaeClient.from_manifest(manifest, "sae-w")
        while not stop.is_set():
            status, body = client.enc_keys("sae-z")
            statuses.append(status)
            if status == 200:
                got.extend(body["keys"])
        client.close()

    threads = [threading.Thread(target=master) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for service, kill in (("X/relay", True), ("Y/gateway020", True),
                              ("Z/keyvault", True), ("Y/relay", False)):
            restart = run_cli(["-m", "lab", "federation", "restart", "--state", str(state),
                               service, *(["--kill"] if kill else [])], timeout=120)
            assert restart.returncode == 0, restart.stdout + restart.stderr
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) > 50 and statuses.count(503) > 0  # faults were hit
    slave = SaeClient.from_manifest(manifest, "sae-z")
    for key in got:
        status, body = slave.dec_keys("sae-w", [key["key_ID"]])
        assert (status, body.get("keys")) == (200, [key])
        assert slave.dec_keys("sae-w", [key["key_ID"]])[0] == 400  # once only
    slave.close()
    # Copies placed for requests that failed are voided (retried until the path is back).
    vaults = {node: KeyVaultClient(grpc.insecure_channel(f"unix:{state}/run/{node}/keyvault.sock"))
              for node in "WXYZ"}
    deadline = time.monotonic() + 60
    while any(v.total_keys() for v in vaults.values()):
        assert time.monotonic() < deadline, {n: v.total_keys() for n, v in vaults.items()}
        time.sleep(0.5)
    down = run_cli(["-m", "lab", "federation", "down", "--state", str(state)], timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr


def test_failed_start_names_the_service_and_leaves_nothing(root: Path) -> None:
    topology = line_topology(root, 65)
    text = topology.read_text()
    # Occupy X's ETSI 020 port: its gateway cannot start.
    x_port = int(text.split('id = "X"')[1].split("etsi020_port = ")[1].split("\n")[0])
    blocker = socket.socket()
    blocker.bind(("127.0.0.66", x_port))
    blocker.listen()
    try:
        up = run_cli(["-m", "lab", "federation", "up", "--topology", str(topology),
                      "--state", str(root / "state"), "--timeout", "60"], timeout=300)
    finally:
        blocker.close()
    assert up.returncode == 1
    assert "X/gateway020" in up.stderr
    assert "X-gateway020.log" in up.stderr
    assert _processes_mentioning(str(root / "state")) == []
    assert not (root / "state" / "pids.json").exists()


def test_systemd_units_verify(tmp_path: Path) -> None:
    units = REPO / "deploy" / "systemd"
    python = REPO / ".venv" / "bin" / "python"
    names = []
    for unit in units.iterdir():
        text = unit.read_text().replace("/opt/kmstn/.venv/bin/python", str(python))
        name = unit.name.replace("@.", "@KMSTN1.")
        (tmp_path / name).write_text(text)
        (tmp_path / unit.name).write_text(text)
        if "@KMSTN1." in name:
            names.append(name)
    assert len(names) == 6  # five services and the node target
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *names],
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stderr.lower(), result.stderr
    for unit in units.glob("kmstn-*@.service"):
        text = unit.read_text()
        assert "RestartPreventExitStatus=78" in text
        assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
        assert "PrivateTmp=yes" in text
    assert "DeviceAllow=/dev/tpmrm0 rw" in (units / "kmstn-keyvault@.service").read_text()
