from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA shared by the whole test session."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory path: unix socket paths are limited to about 100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="km-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
