"""The paper's 8-node testbed (examples/testbed.toml), on free ports, for tests; and the
readdressed start of any example topology (tests/mesh.py uses it for the mesh).

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.federation import Federation
from tests.helpers import REPO, free_port, write_toml

__all__ = ["Testbed", "start_example", "start_testbed"]


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


def write_example(root: Path, example: str, host: Callable[[str], str] = _host) -> Path:
    """``examples/<example>.toml`` with every address moved by ``host`` and free ports."""
    with (REPO / "examples" / f"{example}.toml").open("rb") as fh:
        data = tomllib.load(fh)
    for node in data["kmstn"]:
        node["host"] = addr = host(node["host"])
        for key in ("etsi014_port", "etsi020_port", "relay_port"):
            node[key] = free_port(addr)
    for link in data["qkd_link"]:
        for end in ("alice", "bob"):
            link[end]["host"] = addr = host(link[end]["host"])
            link[end]["port"] = free_port(addr)
    root.mkdir(parents=True, exist_ok=True)
    return write_toml(root / "topology.toml", data)


def write_testbed(root: Path) -> Path:
    return write_example(root, "testbed")


@contextlib.contextmanager
def start_example(example: str, host: Callable[[str], str], prefix: str,
                  **federation: Any) -> Iterator[Testbed]:
    """A lab federation of the example, started by the real launcher, stopped after."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    fed = Federation(write_example(root, example, host), root / "state", **federation)
    try:
        manifest = fed.up(timeout=240)
        yield Testbed(root, fed, manifest)
    finally:
        left = fed.down()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left running: {left}"


def start_testbed(rate_scale: float = 1000.0) -> contextlib.AbstractContextManager[Testbed]:
    return start_example("testbed", _host, "km8-", qkd_rate_scale=rate_scale)
