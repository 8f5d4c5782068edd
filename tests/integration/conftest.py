"""Fixtures for integration tests of the QKD device emulator and the southbound client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.conftest import QkdSim
from tests.contract.conftest import contract_sim as contract_sim  # the same fixture here
from tests.helpers import Pki

SimFactory = Callable[..., QkdSim]


@pytest.fixture
def qkd_sim(tmp_path: Path, pki: Pki) -> Iterator[SimFactory]:
    """Start emulators with chosen link settings; every one is stopped (and must exit 0)."""
    started: list[QkdSim] = []

    def start(**link: Any) -> QkdSim:
        sim = QkdSim(tmp_path / f"sim{len(started)}", pki, **link)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        assert sim.stop() == 0, sim.logs()
