"""A live QKD device emulator (``python -m lab.qkdsim``) for ETSI 014 contract tests.

:class:`QkdSim` writes a topology with two KMSTNs (A, B) and one QKD link
between them, issues the device certificates (CN = kme_id) and SAE
certificates (A and B are the device SAEs; C is an SAE the devices do not
serve), writes ``sim.toml`` and starts the real process. The integration
tests reuse it (tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kme.config import QkdDeviceAccess, QkdLink, TlsFiles, load_topology
from kme.qkd import QkdDeviceClient
from kme.types import NodeId
from lab.qkdsim.config import sim_healthy, write_sim_config
from tests.federation import FederationFiles
from tests.helpers import Pki, ServiceProcess

LINK_ID = "QKD-A-B"


class _Issued:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key


class QkdSim:
    """One emulated link A-B as a real process; Alice serves SAE "A", Bob serves "B"."""

    def __init__(self, root: Path, pki: Pki, *, rate: float = 1_000_000.0,
                 block_size: int = 8192, host: str = "127.0.0.1", name: str = "qkdsim",
                 **link: Any) -> None:
        self.root = root
        self.pki = pki
        fed = FederationFiles(root, pki)
        fed.kmstn("A", host)
        fed.kmstn("B", host)
        fed.qkd("A", "B", rate=rate, block_size=block_size, **link)
        fed.write()
        self.topology_path = fed.topology_path
        self.link: QkdLink = load_topology(fed.topology_path).qkd_links[0]
        self.alice = self.link.device_of(self.link.a)
        self.bob = self.link.device_of(self.link.b)
        self.certs = {name_: _Issued(*pki.issue(name_, ips=(host,)))
                      for name_ in (self.alice.kme_id, self.bob.kme_id, "A", "B", "C")}
        self.config = write_sim_config(root / "sim.toml", topology=fed.topology_path,
                                       link=self.link.id, ca=pki.ca_path,
                                       alice=self.certs[self.alice.kme_id],
                                       bob=self.certs[self.bob.kme_id], log_level="info")
        self.proc = ServiceProcess(["-m", "lab.qkdsim", "--config", str(self.config)], root,
                                   name)
        self.wait_healthy()
        self._sessions: list[requests.Session] = []

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not sim_healthy(self.link, self.pki.ca_path, self.certs, timeout=1.0):
            if self.proc.proc.poll() is not None:
                raise RuntimeError(f"qkdsim exited {self.proc.proc.returncode}:\n"
                                   f"{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"qkdsim not healthy:\n{self.logs()}")
            time.sleep(0.05)

    # -- raw ETSI 014 over requests --------------------------------------------------

    def url(self, end: str, path: str) -> str:
        device = self.alice if end == "alice" else self.bob
        return f"{device.url}{path}"

    def session(self, identity: str | None) -> requests.Session:
        """A keep-alive mTLS session presenting ``identity``'s certificate (None: no cert)."""
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.pki.ca_path)
        if identity is not None:
            s.cert = (str(self.certs[identity].cert), str(self.certs[identity].key))
        self._sessions.append(s)
        return s

    def client(self, node: str, timeout_ms: int = 5000) -> QkdDeviceClient:
        """The node's own southbound client toward its device (node A: Alice, B: Bob)."""
        issued = self.certs[node]
        access = QkdDeviceAccess(self.link.id, TlsFiles(self.pki.ca_path, issued.cert,
                                                        issued.key), timeout_ms)
        return QkdDeviceClient(self.link, NodeId(node), access)

    def ssl_context(self, identity: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
        if identity is not None:
            ctx.load_cert_chain(str(self.certs[identity].cert), str(self.certs[identity].key))
        return ctx

    def health(self, end: str = "alice") -> dict[str, Any]:
        s = self.session(self.alice.kme_id if end == "alice" else self.bob.kme_id)
        r = s.get(self.url(end, "/healthz"), timeout=5)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    def stop(self) -> int:
        for s in self._sessions:
            s.close()
        return self.proc.stop()

    def logs(self) -> str:
        """stdout and stderr of the process (readable after stop, too)."""
        return (self.proc.stdout_path.read_text(errors="replace")
                + self.proc.stderr_path.read_text(errors="replace"))


def assert_error(resp: requests.Response, status: int, message: str | None = None) -> str:
    """ETSI 014 clause 4.5 / checklist: status, application/json, a string ``message``."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].split(";")[0] == "application/json"
    body = json.loads(resp.content)
    assert isinstance(body, dict) and isinstance(body.get("message"), str), body
    if message is not None:
        assert body["message"] == message
    return str(body["message"])


@pytest.fixture(scope="module")
def contract_sim(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[QkdSim]:
    """The contract tests' emulator: generation stopped, a known store, small limits.

    rate_multiplier = 0 makes the store change only by what the tests take,
    so "stored_key_count drops by number" and "more than stored -> 503" are
    exact; 200 keys of 256 bits are there at start.
    """
    sim = QkdSim(tmp_path_factory.mktemp("contract-sim"), pki, max_key_count=1000,
                 max_key_per_request=64, sim={"rate_multiplier": 0.0, "initial_keys": 200})
    yield sim
    assert sim.stop() == 0, sim.logs()
