"""How cheap ETSI 014 ``status`` is for pollers (firewalls probe it as a liveness test).

    python -m lab.statusbench --state DIR --sae sae-w --slave sae-z [--requests 200]
        [--cut LINK --config NODE_TOML]

Over one keep-alive mutual-TLS connection (lab.saeclient), it times
``--requests`` status calls back to back and prints the median, p90 and max in
milliseconds, and the same for enc_keys (one key) to compare. With ``--cut``,
it takes that link down in the node's routing service (``kmstn link``), times
status again (a path that is down must not make status slow or incomplete),
and brings the link back up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.saeclient import SaeClient


def _time(call: Callable[[], tuple[int, Any]], n: int) -> tuple[list[float], set[int]]:
    samples, statuses = [], set()
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = call()
        samples.append((time.perf_counter() - t0) * 1000)
        statuses.add(status)
    return samples, statuses


def _row(name: str, samples: list[float], statuses: set[int]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    return (f"{name:<22} n={len(samples):<5} median {statistics.median(samples):7.2f} ms  "
            f"p90 {p90:7.2f} ms  max {ordered[-1]:7.2f} ms  HTTP {sorted(statuses)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.statusbench", description=__doc__)
    p.add_argument("--state", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--slave", required=True)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--cut", help="a link to take down for the second status run")
    p.add_argument("--config", help="the node file whose routing service --cut changes")
    args = p.parse_args(argv)
    client = SaeClient.from_manifest(Path(args.state) / "federation.json", args.sae)
    try:
        client.status(args.slave)  # open the connection outside the timings
        print(_row("status", *_time(lambda: client.status(args.slave), args.requests)))
        print(_row("enc_keys (1 key)",
                   *_time(lambda: client.enc_keys(args.slave), max(args.requests // 4, 1))))
        if args.cut:
            if not args.config:
                p.error("--cut needs --config")
            from kme.cli import main as kmstn

            kmstn(["link", "--config", args.config, args.cut, "down"])
            try:
                print(_row(f"status, {args.cut} down",
                           *_time(lambda: client.status(args.slave), args.requests)))
            finally:
                kmstn(["link", "--config", args.config, args.cut, "up"])
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
