"""The emulator as a process: configuration (exit 78), health, SIGTERM, bind failure, logs."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lab.qkdsim.config import load_sim_config, sim_healthy, write_sim_config
from tests.contract.conftest import QkdSim
from tests.federation import FederationFiles
from tests.helpers import REPO, Pki, ServiceProcess, run_cli
from tests.integration.conftest import SimFactory

pytestmark = pytest.mark.integration


class Files:
    """A valid topology + sim.toml to break one field at a time."""

    def __init__(self, root: Path, pki: Pki, **link: Any) -> None:
        fed = FederationFiles(root, pki)
        fed.kmstn("A")
        fed.kmstn("B")
        fed.qkd("A", "B", **link)
        fed.pqc("A", "B")
        fed.write()
        self.root = root
        self.topology = fed.topology_path
        self.pki = pki
        self.alice = pki.issue("QKD-A-B-alice")
        self.bob = pki.issue("QKD-A-B-bob")

    def sim_toml(self, **override: Any) -> Path:
        data: dict[str, Any] = {
            "topology": str(self.topology), "link": "QKD-A-B", "ca": str(self.pki.ca_path),
            "alice": {"cert": str(self.alice[0]), "key": str(self.alice[1])},
            "bob": {"cert": str(self.bob[0]), "key": str(self.bob[1])},
        }
        for k, v in override.items():
            if v is None:
                data.pop(k, None)
            else:
                data[k] = v
        lines = []
        for k, v in data.items():
            if not isinstance(v, dict):
                lines.append(f"{k} = {json.dumps(v)}")
        for k, v in data.items():
            if isinstance(v, dict):
                lines.append(f"[{k}]")
                lines += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
        path = self.root / "sim.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


@pytest.fixture
def files(tmp_path: Path, pki: Pki) -> Files:
    return Files(tmp_path, pki)


def test_check_config_accepts_a_valid_file(files: Files) -> None:
    result = run_cli(["-m", "lab.qkdsim", "--config", str(files.sim_toml()), "--check-config"])
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    cfg = load_sim_config(files.sim_toml())
    assert cfg.link.id == "QKD-A-B" and cfg.device("bob").kme_id == "QKD-A-B-bob"


def test_console_script_is_installed(files: Files) -> None:
    script = Path(REPO) / ".venv" / "bin" / "kmstn-qkdsim"
    result = subprocess.run([str(script), "--config", str(files.sim_toml()), "--check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("override", "field", "problem"), [
    ({"extra": 1}, "extra", "unknown key"),
    ({"link": None}, "link", "is required"),
    ({"link": "QKD-X"}, "link", "is not a QKD link of the topology"),
    ({"link": "PQC-A-B"}, "link", "is not a QKD link"),
    ({"ca": "/nonexistent/ca.pem"}, "ca", "file not found"),
    ({"alice": None}, "alice", "is required"),
    ({"bob": {"cert": "/nonexistent.pem", "key": "/nonexistent.key"}}, "bob.cert",
     "file not found"),
    ({"alice": {"cert": "BOB_CERT", "key": "BOB_KEY"}}, "alice.cert", "kme_id"),
    ({"alice": {"cert": "ALICE_CERT", "key": "BOB_KEY"}}, "alice.key", "cannot load"),
    ({"alice": {"cert": "ALICE_CERT", "key": "ALICE_KEY", "port": 1}}, "alice.port",
     "unknown key"),
    ({"log": {"level": "loud"}}, "log.level", "must be one of"),
])
def test_bad_configuration_exits_78_naming_the_field(files: Files, override: dict[str, Any],
                                                     field: str, problem: str) -> None:
    swap = {"ALICE_CERT": str(files.alice[0]), "ALICE_KEY": str(files.alice[1]),
            "BOB_CERT": str(files.bob[0]), "BOB_KEY": str(files.bob[1])}
    override = {k: ({kk: swap.get(vv, vv) for kk, vv in v.items()} if isinstance(v, dict)
                    else v) for k, v in override.items()}
    cfg = files.sim_toml(**override)
    result = run_cli(["-m", "lab.qkdsim", "--config", str(cfg)])
    assert result.returncode == 78, result.stderr
    assert f"{cfg}: {field}: " in result.stderr, result.stderr
    assert problem in result.stderr


def test_a_bad_topology_exits_78(files: Files) -> None:
    files.topology.write_text(files.topology.read_text() + "\nbogus = 1\n")
    result = run_cli(["-m", "lab.qkdsim", "--config", str(files.sim_toml())])
    assert result.returncode == 78
    assert "bogus: unknown key" in result.stderr


def test_key_size_not_whole_bytes_exits_78(tmp_path: Path, pki: Pki) -> None:
    f = Files(tmp_path, pki, key_size=252)
    result = run_cli(["-m", "lab.qkdsim", "--config", str(f.sim_toml())])
    assert result.returncode == 78
    assert "not a multiple of 8" in result.stderr


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    result = run_cli(["-m", "lab.qkdsim", "--config", str(tmp_path / "none.toml")])
    assert result.returncode == 78
    assert "file not found" in result.stderr


def test_busy_port_exits_1(files: Files) -> None:
    link = load_sim_config(files.sim_toml()).link
    device = link.device_of(link.b)
    with socket.socket() as blocker:
        blocker.bind((device.host, device.port))
        blocker.listen(1)
        result = run_cli(["-m", "lab.qkdsim", "--config", str(files.sim_toml())])
    assert result.returncode == 1
    assert f"cannot listen on {device.host}:{device.port}" in result.stderr


def test_health_sigterm_and_json_logs_without_key_bytes(files: Files) -> None:
    cfg_path = files.sim_toml(log={"level": "debug"})
    cfg = load_sim_config(cfg_path)
    certs = {"QKD-A-B-alice": _Pair(*files.alice), "QKD-A-B-bob": _Pair(*files.bob)}
    proc = ServiceProcess(["-m", "lab.qkdsim", "--config", str(cfg_path)], files.root, "sim")
    try:
        deadline = time.monotonic() + 30
        while not sim_healthy(cfg.link, files.pki.ca_path, certs, timeout=1.0):
            assert proc.proc.poll() is None, proc.logs()
            assert time.monotonic() < deadline, proc.logs()
            time.sleep(0.05)
        # Keys through the API, so the debug log has request lines.
        sim = _Handle(files, cfg)
        a = sim.client("A")
        b = sim.client("B")
        keys = a.enc_keys(3)
        got = b.dec_keys([k.key_id for k in keys])
        a.close()
        b.close()
        assert [k.material for k in got] == [k.material for k in keys]
    finally:
        rc = proc.stop()
    assert rc == 0
    assert not sim_healthy(cfg.link, files.pki.ca_path, certs, timeout=0.5)
    lines = [json.loads(line) for line in proc.stdout_path.read_text().splitlines()]
    assert {"listening", "request", "stopping", "stopped"} <= {line["msg"] for line in lines}
    assert all(line["service"] == "qkdsim" and line["node"] == "QKD-A-B" for line in lines)
    logs = proc.stdout_path.read_text() + proc.stderr_path.read_text()
    for k in keys:  # canary: no key bytes, in any encoding, in the logs
        raw = k.material.reveal()
        assert k.material.b64() not in logs and raw.hex() not in logs


class _Pair:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key


class _Handle(QkdSim):
    """QkdSim's client helpers over an already running process."""

    def __init__(self, files: Files, cfg: Any) -> None:
        self.pki = files.pki
        self.link = cfg.link
        self.certs = {n: _Pair(*files.pki.issue(n)) for n in ("A", "B")}


def test_write_sim_config_round_trips(tmp_path: Path, qkd_sim: SimFactory) -> None:
    sim = qkd_sim()
    path = write_sim_config(tmp_path / "again.toml", topology=sim.topology_path,
                            link=sim.link.id, ca=sim.pki.ca_path,
                            alice=sim.certs[sim.alice.kme_id], bob=sim.certs[sim.bob.kme_id],
                            log_level="warning")
    cfg = load_sim_config(path)
    assert cfg.link == sim.link and cfg.log_level == "warning"
    assert sim_healthy(sim.link, sim.pki.ca_path, sim.certs)
    assert not sim_healthy(sim.link, sim.pki.ca_path, {})
