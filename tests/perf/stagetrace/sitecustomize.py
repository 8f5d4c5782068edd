"""Stage timing for a running federation (a development tool, not shipped).

With ``KMSTN_STAGE_TRACE=DIR`` in the environment and this directory on
``PYTHONPATH``, every kmstn process started from that environment records
the start and end (wall clock, microseconds) of a few methods on the hot
path of a key exchange into ``DIR/<pid>.trace``; ``analyze.py`` turns them
into per-stage medians. Only method names and times are written, never an
argument or a result. Without the variable this module does nothing.

    export PYTHONPATH=tests/perf/stagetrace KMSTN_STAGE_TRACE=/tmp/trace
    kmstn federation up --topology examples/testbed.toml --state /tmp/fed ...
    kmstn bench delay --state /tmp/fed --pairs SAE1:SAE8 --requests 40
    python tests/perf/stagetrace/analyze.py /tmp/trace
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import threading
import time
import types
from typing import Any, TextIO

# module -> [(class, [methods])]: the stages of enc_keys, a hop and dec_keys.
TARGETS: dict[str, list[tuple[str, list[str]]]] = {
    "kme.flows.northbound": [("Northbound", ["enc_keys"])],
    "kme.flows.receive": [("Receiver", ["ext_keys", "device_keys", "plan"])],
    "relay.client": [("RelayClient", ["get_keys", "receive"])],
    "relay.ports": [("VaultPort", ["store"])],
    "relay.transport": [("Transport", ["send"])],
    "keyvault.client": [("KeyVaultClient", ["take"])],
    "kme.qkd": [("QkdDeviceClient", ["enc_keys", "dec_keys"])],
    "relay.service": [("RelayService", ["GetKeys", "Receive"])],
    "relay.hop": [("Sealer", ["seal_detailed"]), ("Opener", ["open"])],
    "keyvault.service": [("KeyVaultService", ["Store", "Take"])],
    "keyvault.store": [("Vault", ["store_keys", "take"])],
    "flask.app": [("Flask", ["wsgi_app"])],
}

_out: TextIO | None = None
_lock = threading.Lock()


def _write(line: str) -> None:
    global _out
    with _lock:
        if _out is None or _out.closed:
            path = os.path.join(os.environ["KMSTN_STAGE_TRACE"], f"{os.getpid()}.trace")
            _out = open(path, "a", buffering=1)  # open until exit
            _out.write("# " + json.dumps(sys.argv) + "\n")
        _out.write(line)


def _wrap(cls: type, name: str) -> None:
    original = getattr(cls, name)
    label = f"{cls.__name__}.{name}"

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            _write(f"{start:.6f} {time.time():.6f} {label}\n")

    setattr(cls, name, timed)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the listed methods right after their module is executed."""

    def find_spec(self, fullname: str, path: Any, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            execute(module)
            for cls_name, methods in TARGETS[fullname]:
                for method in methods:
                    _wrap(getattr(module, cls_name), method)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("KMSTN_STAGE_TRACE"):
    os.makedirs(os.environ["KMSTN_STAGE_TRACE"], exist_ok=True)
    sys.meta_path.insert(0, _Finder())
