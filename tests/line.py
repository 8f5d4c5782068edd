"""A line of four KMSTNs in two QKD islands, for the consumer tests (issue 14).

    W =QKD= X --PQC-- Y =QKD= Z          (islands {W, X} and {Y, Z})

A key from sae-w (at W) for sae-z (at Z) crosses three hops: a QKD hop
(QKD key XOR ML-KEM), a PQC hop (ML-KEM alone) and a QKD hop again. Started by
the real launcher (lab.federation), every service its own process, with real
swtpm, SQLCipher and mutual TLS.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.federation import Federation
from tests.federation import FederationFiles

# 127.0.0.61-78 are the launcher tests' lines; these are ours alone.
HOSTS = {"W": "127.0.0.91", "X": "127.0.0.92", "Y": "127.0.0.93", "Z": "127.0.0.94"}
PQC_LINK = "PQC-X-Y"


@dataclass
class Line:
    root: Path
    federation: Federation
    manifest: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def ca(self) -> str:
        return str(self.manifest["ca"])

    def url(self, node: str) -> str:
        return str(next(k["etsi014_url"] for k in self.manifest["kmstns"] if k["id"] == node))

    def cert(self, sae: str) -> tuple[str, str]:
        entry = next(s for s in self.manifest["saes"] if s["id"] == sae)
        return str(entry["cert"]), str(entry["key"])

    def node_file(self, node: str) -> Path:
        return self.federation.node_file(node)


def write_line_topology(root: Path) -> Path:
    """The topology file of the line (fresh ports), under ``root``."""
    files = FederationFiles(root, pki=None)  # type: ignore[arg-type]
    for node, host in HOSTS.items():
        files.kmstn(node, host)
    files.qkd("W", "X", rate=1_000_000.0, block_size=8192, sim={"initial_keys": 500})
    files.pqc("X", "Y")
    files.qkd("Y", "Z", rate=1_000_000.0, block_size=8192, sim={"initial_keys": 500})
    for node in HOSTS:
        files.sae(f"sae-{node.lower()}", node)
    files.sae("sae-w2", "W")
    return files.write()


@contextlib.contextmanager
def start_line(delivery: str = "confirmed") -> Iterator[Line]:
    root = Path(tempfile.mkdtemp(prefix="kmline-", dir="/tmp"))
    topology = write_line_topology(root)
    federation = Federation(topology, root / "state", delivery=delivery)
    try:
        manifest = federation.up(timeout=240)
        yield Line(root, federation, manifest)
    finally:
        left = federation.down()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left running: {left}"


__all__ = ["HOSTS", "PQC_LINK", "Line", "start_line", "write_line_topology"]
