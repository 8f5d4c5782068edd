"""The paper's 8-node testbed (examples/testbed.toml), on free ports, for tests.

Same nodes, links, rates and SAEs as the example; only the addresses move
(127.0.0.1X -> 127.0.0.8X, ports picked free) so that a test run does not
collide with a demo or another run on the same machine. Started by the real
launcher with ``qkd_rate_scale`` 1000, as ``kmstn federation up
--qkd-rate-scale 1000`` does.
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

__all__ = ["Testbed", "start_testbed"]


def _host(original: str) -> str:
    last = int(original.rsplit(".", 1)[1])
    return f"127.0.0.{80 + last % 10}"


@dataclass
class Testbed:
    __test__ = False  # a fixture value, not a test class
    root: Path
    federation: Federation
    manifest: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.federation.state

    def node_file(self, node: str) -> Path:
        return self.federation.node_file(node)


def write_testbed(root: Path) -> Path:
    with (REPO / "examples" / "testbed.toml").open("rb") as fh:
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
def start_testbed(rate_scale: float = 1000.0) -> Iterator[Testbed]:
    root = Path(tempfile.mkdtemp(prefix="km8-", dir="/tmp"))
    federation = Federation(write_testbed(root), root / "state", qkd_rate_scale=rate_scale)
    try:
        manifest = federation.up(timeout=240)
        yield Testbed(root, federation, manifest)
    finally:
        left = federation.down()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left running: {left}"
