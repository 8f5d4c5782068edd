"""The live federation used by integration and contract tests.

    E =QKD(5 keys)= A =QKD= B --PQC-- C
                    |       |         |
    H =QKD(5 keys)==+      site      site
                            F         G      (foreign KMSs, plain ETSI 020)

A-B is a fast QKD link; A-E and A-H are QKD links that generate nothing and
start with 5 keys (to test counts and exhaustion: E for the ETSI 014
contract tests, H for the ETSI 020 ones, so neither depends on the other);
F and G are foreign KMSs (tests/foreign_kms.py, separate processes) on site
links to B and C.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from lab.federation import Federation
from tests.federation import FederationFiles
from tests.helpers import REPO, free_port

HOSTS = {"A": "127.0.0.31", "B": "127.0.0.32", "C": "127.0.0.33", "F": "127.0.0.34",
         "E": "127.0.0.35", "G": "127.0.0.36", "H": "127.0.0.37"}
EMPTY_LINK_KEYS = 5


@dataclass
class Trio:
    root: Path
    federation: Federation
    manifest: dict[str, Any]
    foreign_url: str
    foreign_cert: tuple[str, str]
    other_foreign_url: str = ""

    @property
    def ca(self) -> str:
        return str(self.manifest["ca"])

    def node(self, node: str) -> dict[str, Any]:
        return next(k for k in self.manifest["kmstns"] if k["id"] == node)

    def foreign_session(self) -> requests.Session:
        """A plain ETSI 020 V1.1.1 client holding the foreign KMS's certificate."""
        s = requests.Session()
        s.trust_env = False
        s.verify = self.ca
        s.cert = self.foreign_cert
        return s


@contextlib.contextmanager
def start_trio(delivery: str = "confirmed", log_level: str = "info") -> Iterator[Trio]:
    root = Path(tempfile.mkdtemp(prefix="km3-", dir="/tmp"))
    files = FederationFiles(root, pki=None)  # type: ignore[arg-type]
    for node in ("A", "B", "C", "E", "H"):
        files.kmstn(node, HOSTS[node])
    for node in ("F", "G"):
        files.kmstn(node, HOSTS[node], kind="foreign")
    files.qkd("A", "B", rate=2_000_000.0, block_size=16384, max_key_count=200_000)
    for node in ("E", "H"):
        files.qkd("A", node, rate=1000.0, block_size=256, max_key_count=1000,
                  sim={"rate_multiplier": 0.0, "initial_keys": EMPTY_LINK_KEYS})
    files.pqc("B", "C")
    files.site("B", "F")
    files.site("C", "G")
    for sae, node in (("sae-a1", "A"), ("sae-a2", "A"), ("sae-b", "B"), ("sae-c1", "C"),
                      ("sae-c2", "C"), ("sae-e", "E"), ("sae-h", "H"), ("sae-f", "F"),
                      ("sae-g", "G")):
        files.sae(sae, node)
    topology = files.write()
    federation = Federation(topology, root / "state", delivery=delivery, log_level=log_level)
    foreign: list[subprocess.Popen[bytes]] = []
    try:
        manifest = federation.up(timeout=180)
        certs = root / "state" / "pki" / "certs"
        urls = {}
        for name in ("F", "G"):
            port = next(k["etsi020_port"] for k in files.data["kmstn"] if k["id"] == name)
            log = (root / "state" / "logs" / f"{name}-foreign.log").open("wb")
            foreign.append(subprocess.Popen(
                [sys.executable, "-m", "tests.foreign_kms", "--name", name, "--host",
                 HOSTS[name], "--port", str(port), "--ca", manifest["ca"],
                 "--cert", str(certs / f"{name}.pem"), "--key", str(certs / f"{name}.key")],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
            urls[name] = f"https://{HOSTS[name]}:{port}"
        trio = Trio(root, federation, manifest, urls["F"],
                    (str(certs / "F.pem"), str(certs / "F.key")), urls["G"])
        _wait_foreign(trio, urls["F"])
        _wait_foreign(trio, urls["G"])
        yield trio
    finally:
        for proc in foreign:
            proc.terminate()
            proc.wait(10)
        left = federation.down()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left running: {left}"


def _wait_foreign(trio: Trio, url: str) -> None:
    s = trio.foreign_session()
    for _ in range(100):
        with contextlib.suppress(requests.RequestException):
            if s.get(url + "/kmapi/versions", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("foreign KMS did not start")


__all__ = ["EMPTY_LINK_KEYS", "HOSTS", "Trio", "free_port", "start_trio"]
