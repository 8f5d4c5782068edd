"""Issue 10, by construction: the WAN-facing ETSI 020 gateway cannot open an envelope.

The 020 listener process imports the gateway package and what it needs to
hand a sealed body to the relay; none of the modules that hold hop keys,
KEM secrets or the key negotiation may come with it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

# What can open an envelope or act on keys: the relay's hop machinery and the flows.
FORBIDDEN = ("relay.envelope", "relay.kem", "relay.hop", "relay.hopkey", "relay.peer",
             "relay.qkdreserve", "relay.transport", "relay.service", "relay.ports",
             "kme.flows", "kme.qkd")


def _modules_after(imports: str) -> set[str]:
    code = f"import sys, json\n{imports}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True, timeout=120)
    return set(json.loads(out.stdout))


def _offending(modules: set[str]) -> list[str]:
    return sorted(m for m in modules
                  if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_the_020_gateway_imports_nothing_that_opens_an_envelope() -> None:
    modules = _modules_after("import gateway.__main__, gateway.serve020, gateway.app, "
                             "gateway.deps, gateway.etsi020.views")
    assert "gateway.etsi020.views" in modules and "relay.client" in modules
    assert _offending(modules) == []


def test_the_check_sees_a_forbidden_import() -> None:
    # The same check on the relay's own entry point finds what it looks for.
    assert "relay.envelope" in _offending(_modules_after("import relay.__main__"))
