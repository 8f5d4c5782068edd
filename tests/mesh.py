"""The mesh of examples/mesh.toml (two islands, two disjoint PQC paths, a QKD ring), for tests.

Same nodes, links, costs and SAEs as the example; only the addresses move
(127.0.0.4X -> 127.0.0.5X, ports picked free) so that a test run does not
collide with ``make demo-mesh`` on the same machine. Started by the real
launcher, so every node runs from its per-node file and learns the rest by
signed link state.
"""

from __future__ import annotations

import contextlib

from tests.testbed import Testbed, start_example

__all__ = ["Mesh", "start_mesh"]

Mesh = Testbed  # the same handle: root, federation, manifest


def _host(original: str) -> str:
    return "127.0.0.5" + original.rsplit(".", 1)[1][-1]


def start_mesh() -> contextlib.AbstractContextManager[Mesh]:
    return start_example("mesh", _host, "kmmesh-")
