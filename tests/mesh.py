"""The mesh of examples/mesh.toml (two islands, two disjoint PQC paths, a QKD ring), for tests.

Same nodes, links, costs and SAEs as the example; only the addresses move
(127.0.0.4X -> 127.0.0.5X, ports picked free) so that a test run does not
collide with ``make demo-mesh`` on the same machine. Started by the real
launcher, so every node runs from its per-node file and learns the rest by
signed link state.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.federation import Federation
from tests.helpers import REPO, free_port, write_toml

__all__ = ["Mesh", "start_mesh"]


def _host(original: str) -> str:
    return "127.0.0.5" + original.rsplit(".", 1)[1][-1]


@dataclass
class Mesh:
    __test__ = False  # a fixture value, not a test class
    root: Path
    federation: Federation
    manifest: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.federation.state

    def node_file(self, node: str) -> Path:
        return self.federation.node_file(node)


def write_mesh(root: Path) -> Path:
    with (REPO / "examples" / "mesh.toml").open("rb") as fh:
        data = tomllib.load(fh)
    for node in data["kmstn"]:
        node["host"] = host = _host(node["host"])
        for key in ("etsi014_port", "etsi020_port", "relay_port"):
            node[key] = free_port(host)
    for link in data["qkd_link"]:
        for end in ("alice", "bob"):
            link[end]["host"] = host = _host(link[end]["host"])
            link[end]["port"] = free_port(host)
    root.mkdir(parents=True, exist_ok=True)
    return write_toml(root / "topology.toml", data)


@contextlib.contextmanager
def start_mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="kmmesh-", dir="/tmp"))
    federation = Federation(write_mesh(root), root / "state")
    try:
        manifest = federation.up(timeout=240)
        yield Mesh(root, federation, manifest)
    finally:
        left = federation.down()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left running: {left}"
