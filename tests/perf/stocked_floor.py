"""A stocked key's enc-to-available against the floor of the same two requests (dev benchmark).

    python tests/perf/stocked_floor.py STATE [--master SAE1] [--slave SAE8] [--rounds 50]

On a running federation (``kmstn federation up --state STATE``, with a stock
for the pair, e.g. ``--node-settings examples/supply-stocks.toml``) it runs,
interleaved round by round so that all three see the same machine:

- stocked: enc_keys at the master's KMSTN, then dec_keys of that key at the
  slave's (as ``kmstn bench delay`` does: enc-to-available is their sum);
- floor: Get status at the master's KMSTN, then dec_keys of a key ID that
  does not exist at the slave's. The same two TLS connections, the same
  alternation between the two nodes, and the same internal gRPC call per
  request (014 gateway -> relay, 014 gateway -> keyvault), with no key work
  behind either;
- HTTPS only: ``/healthz`` at each, which crosses no internal call.

It prints the median of each request and of each pair, and the stocked pair
over the floor. A stocked key cannot be available sooner than the floor
pair, whatever the stock does.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lab.saeclient import SaeClient

UNKNOWN_ID = str(uuid.UUID(int=0, version=4))


def _timed(call: Callable[[], tuple[int, object]], want: int) -> float:
    t0 = time.perf_counter()
    status, body = call()
    took = (time.perf_counter() - t0) * 1000
    if status != want:
        raise SystemExit(f"expected HTTP {want}, got {status}: {body}")
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("state", type=Path)
    p.add_argument("--master", default="SAE1")
    p.add_argument("--slave", default="SAE8")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--pause-ms", type=float, default=2.0,
                   help="idle time between the three parts of a round (default 2 ms)")
    args = p.parse_args()
    manifest = args.state / "federation.json"
    master = SaeClient.from_manifest(manifest, args.master)
    slave = SaeClient.from_manifest(manifest, args.slave)
    rows: dict[str, list[float]] = {name: [] for name in (
        "stocked enc_keys", "stocked dec_keys", "stocked pair",
        "floor Get status", "floor dec_keys (unknown ID)", "floor pair",
        "healthz master", "healthz slave", "healthz pair")}

    def stocked() -> None:
        t0 = time.perf_counter()
        status, body = master.enc_keys(args.slave, 1)
        enc = (time.perf_counter() - t0) * 1000
        if status != 200:
            raise SystemExit(f"enc_keys: HTTP {status}: {body}")
        key_id = body["keys"][0]["key_ID"]  # type: ignore[index]
        dec = _timed(lambda: slave.dec_keys(args.master, [key_id]), 200)
        rows["stocked enc_keys"].append(enc)
        rows["stocked dec_keys"].append(dec)
        rows["stocked pair"].append(enc + dec)

    def floor() -> None:
        a = _timed(lambda: master.status(args.slave), 200)
        b = _timed(lambda: slave.dec_keys(args.master, [UNKNOWN_ID]), 400)
        rows["floor Get status"].append(a)
        rows["floor dec_keys (unknown ID)"].append(b)
        rows["floor pair"].append(a + b)

    def https_only() -> None:
        a = _timed(lambda: master.get("/healthz"), 200)
        b = _timed(lambda: slave.get("/healthz"), 200)
        rows["healthz master"].append(a)
        rows["healthz slave"].append(b)
        rows["healthz pair"].append(a + b)

    for part in (stocked, floor, https_only):  # warm the connections and the code paths
        part()
    for name in rows:
        rows[name].clear()
    for _ in range(args.rounds):
        for part in (stocked, floor, https_only):
            time.sleep(args.pause_ms / 1000)
            part()
    master.close()
    slave.close()
    print(f"{args.master} -> {args.slave}, {args.rounds} rounds")
    for name, values in rows.items():
        print(f"  {name:<30} p50 {statistics.median(values):7.2f} ms"
              f"   p95 {sorted(values)[int(0.95 * (len(values) - 1))]:7.2f} ms")
    ratio = statistics.median(rows["stocked pair"]) / statistics.median(rows["floor pair"])
    print(f"  stocked pair / floor pair (p50): {ratio:.2f}")


if __name__ == "__main__":
    main()
