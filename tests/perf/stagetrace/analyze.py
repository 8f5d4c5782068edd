"""Per-stage medians from the traces written under KMSTN_STAGE_TRACE.

    python tests/perf/stagetrace/analyze.py DIR [--since EPOCH_SECONDS]

For each internal gRPC call seen from both ends (the gateway's adapter and
the service's handler in the same node) it prints the time from the call to
the handler starting ("dispatch"), from the handler ending back to the
caller ("return"), and the handler itself; then the HTTPS leg from sealing
at one relay to the next node's 020 gateway starting the request, and the
medians of the crypto, storage and device stages.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from typing import NamedTuple


class Event(NamedTuple):
    start: float
    end: float
    node: str
    service: str
    name: str


def _process(argv: list[str]) -> tuple[str, str]:
    # ``python -m gateway`` leaves .../gateway/__main__.py in argv[0].
    script = argv[0] if argv else "?"
    service = (os.path.basename(os.path.dirname(script)) if script.endswith("__main__.py")
               else os.path.basename(script))
    if "--api" in argv:
        service += "-" + argv[argv.index("--api") + 1]
    config = argv[argv.index("--config") + 1] if "--config" in argv else ""
    node = os.path.basename(os.path.dirname(config)) or "?"
    return node, service


def load(directory: str, since: float) -> list[Event]:
    events: list[Event] = []
    for path in glob.glob(os.path.join(directory, "*.trace")):
        node = service = "?"
        with open(path) as f:
            for line in f:
                if line.startswith("# "):
                    node, service = _process(json.loads(line[2:]))
                    continue
                start, end, name = line.split()
                if float(start) >= since:
                    events.append(Event(float(start), float(end), node, service, name))
    return sorted(events)


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:6.2f} ms" if values else "     -   "


def grpc_legs(events: list[Event], caller: str, handler: str) -> str:
    dispatch, back, work = [], [], []
    handlers = [e for e in events if e.name == handler]
    for c in (e for e in events if e.name == caller):
        for h in handlers:
            if h.node == c.node and c.start <= h.start and h.end <= c.end:
                dispatch.append(h.start - c.start)
                back.append(c.end - h.end)
                work.append(h.end - h.start)
                break
    return (f"{caller:<22} -> {handler:<22} n={len(work):<5} dispatch {_ms(dispatch)}  "
            f"return {_ms(back)}  handler {_ms(work)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("--since", type=float, default=0.0)
    args = p.parse_args()
    events = load(args.directory, args.since)
    for caller, handler in (("RelayClient.get_keys", "RelayService.GetKeys"),
                            ("RelayClient.receive", "RelayService.Receive"),
                            ("VaultPort.store", "KeyVaultService.Store"),
                            ("KeyVaultClient.take", "KeyVaultService.Take")):
        print(grpc_legs(events, caller, handler))
    requests = [e for e in events if e.name == "Flask.wsgi_app" and "etsi020" in e.service]
    https = []
    for seal in (e for e in events if e.name == "Sealer.seal_detailed"):
        later = [r for r in requests if r.start >= seal.end and r.node != seal.node]
        if later:
            https.append(later[0].start - seal.end)
    print(f"{'sealed at a relay -> next 020 gateway request starts':<56} n={len(https):<5} "
          f"{_ms(https)}")
    for name in ("Sealer.seal_detailed", "Opener.open", "Vault.store_keys", "Vault.take",
                 "QkdDeviceClient.enc_keys", "QkdDeviceClient.dec_keys",
                 "Receiver.plan", "Transport.send", "Northbound.enc_keys",
                 "Receiver.ext_keys", "Receiver.device_keys"):
        values = [e.end - e.start for e in events if e.name == name]
        print(f"{name:<56} n={len(values):<5} {_ms(values)}")


if __name__ == "__main__":
    main()
