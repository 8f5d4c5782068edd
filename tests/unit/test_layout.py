"""The tree's layering: the node core never depends on the lab tooling.

``kme/`` is what every production process imports; ``lab/`` (the federation
launcher, demo, benchmarks, SAE client, throwaway CA and the QKD device
emulator) is for labs and tests. Two checks, one static and one executed: no
module under kme/ (or of a service package, benchmarks aside) names ``lab`` in
an import, and importing every kme module loads no ``lab`` module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

# The generated gRPC stubs import only protobuf and grpc; protos/generate.py owns them.
GENERATED = REPO / "kme" / "rpc"
SERVICES = ("keyvault", "routing", "relay", "gateway")


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py")
                  if GENERATED not in p.parents)


def _imported_roots(path: Path) -> set[str]:
    """Top-level package of every absolute import in ``path`` (at any depth)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_scan_sees_kme_and_lab_imports() -> None:
    # Guards the scan itself: if it read nothing, the next tests would pass vacuously.
    assert len(_sources("kme")) > 15
    assert "kme" in _imported_roots(REPO / "kme" / "cli.py")
    assert "lab" in _imported_roots(REPO / "lab" / "cli.py")


def test_no_kme_module_imports_lab() -> None:
    offenders = [str(p.relative_to(REPO)) for p in _sources("kme") if "lab" in _imported_roots(p)]
    assert offenders == []


def test_no_service_module_imports_lab() -> None:
    # Benchmarks start emulated devices and may use the lab; the processes may not.
    offenders = [str(p.relative_to(REPO)) for pkg in SERVICES for p in _sources(pkg)
                 if not p.name.startswith("bench") and "lab" in _imported_roots(p)]
    assert offenders == []


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import kme
names = [m.name for m in pkgutil.walk_packages(kme.__path__, "kme.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names,
                  "lab": sorted(m for m in sys.modules if m == "lab" or m.startswith("lab."))}))
"""


def test_importing_every_kme_module_loads_no_lab_module() -> None:
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True,
                            text=True, cwd=REPO, timeout=120, check=True)
    seen = json.loads(result.stdout)
    assert "kme.config" in seen["imported"] and "kme.cli" in seen["imported"]
    assert seen["lab"] == []
