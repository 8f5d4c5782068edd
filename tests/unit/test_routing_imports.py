"""Only the routing process imports scipy: every other service follows the forwarding
table with code that pulls in neither scipy nor numpy (36 MB per process)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

# The services whose processes must stay light, walked module by module so a
# module added later is checked too, and the routing modules they use.
PACKAGES = ("gateway", "relay", "keyvault", "kme")
ROUTING_FOR_SUBSCRIBERS = ("routing.table", "routing.follower", "routing.client",
                           "routing.convert")
# kme.__main__ runs the kmstn CLI when imported; kme.cli, which it imports, is
# checked with the rest.
SKIP = ("kme.__main__",)

PROBE = """
import importlib, json, pkgutil, sys
packages, extra, skip = json.loads(sys.argv[1])
names = []
for pkg in packages:
    names.append(pkg)
    for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        if info.name not in skip:
            names.append(info.name)
names.extend(extra)
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.partition(".")[0] in ("scipy", "numpy"))
print(json.dumps({"imported": names, "heavy": heavy}))
"""


def test_no_service_but_routing_imports_scipy_or_numpy() -> None:
    args = json.dumps([PACKAGES, ROUTING_FOR_SUBSCRIBERS, SKIP])
    result = subprocess.run([sys.executable, "-c", PROBE, args],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    # The walk really covered the processes' code (the gateway builds its
    # routes in gateway.deps) and the follower.
    assert {"gateway.deps", "gateway.app", "relay.service", "keyvault.service", "kme.flows",
            "routing.follower"} <= set(found["imported"])
    assert found["heavy"] == []
