from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers import Pki
from tests.testbed import Testbed
from tests.trio import Trio

# Hypothesis' per-example deadline is a timed assertion: on a shared 2-core
# machine it fails for load, not for bugs. Speed is measured by benchmarks.
settings.register_profile("kmstn", deadline=None)
settings.load_profile("kmstn")


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


@pytest.fixture(scope="session")
def trio() -> Iterator[Trio]:
    """A real three-node federation plus a foreign KMS, started by the real launcher.

    A =QKD= B --PQC-- C, and B --site-- F where F is a foreign KMS speaking
    plain ETSI 020 (tests/foreign_kms.py, its own process). Every kmstn
    service runs as its own process with real swtpm, SQLCipher and mTLS.
    """
    from tests.trio import start_trio

    with start_trio() as federation:
        yield federation


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    """The paper's 8-node testbed (examples/testbed.toml) on free ports, QKD rates x1000."""
    from tests.testbed import start_testbed

    with start_testbed() as federation:
        yield federation
