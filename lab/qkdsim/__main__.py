"""``python -m lab.qkdsim --config sim.toml``: one emulated QKD device pair."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from kme import log as kmelog
from kme.config import load_or_exit
from lab.qkdsim.config import SimConfig, load_sim_config, server_context
from lab.qkdsim.device import DeviceKme
from lab.qkdsim.httpserver import HttpsListener
from lab.qkdsim.store import End, KeyStream

__all__ = ["main"]

PROG = "kmstn-qkdsim"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="emulated QKD device pair (ETSI GS QKD 014) for one QKD link")
    parser.add_argument("--config", required=True, type=Path, help="emulator file (sim.toml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and exit")
    return parser.parse_args(argv)


async def _run(config: SimConfig, log: logging.Logger) -> int:
    stream = KeyStream(config.link)
    listeners: list[HttpsListener] = []
    ends: tuple[End, End] = ("alice", "bob")
    for end in ends:
        device = config.device(end)
        kme = DeviceKme(end, config.link, stream, log)
        listeners.append(HttpsListener(f"{config.link.id}/{end}", device.host, device.port,
                                       server_context(config.tls(end)), kme.handle, log))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    started: list[HttpsListener] = []
    try:
        for listener in listeners:
            await listener.start()
            started.append(listener)
    except OSError as exc:
        log.error("cannot listen", extra={"address": listener.address, "error": str(exc)})
        print(f"{PROG}: cannot listen on {listener.address}: {exc.strerror or exc}",
              file=sys.stderr)
        for other in started:
            await other.stop()
        return 1
    log.info("listening", extra={
        "link": config.link.id,
        "alice": {"address": listeners[0].address, "kme_id": config.device("alice").kme_id,
                  "sae_id": config.device("alice").sae_id},
        "bob": {"address": listeners[1].address, "kme_id": config.device("bob").kme_id,
                "sae_id": config.device("bob").sae_id},
        "secret_key_rate": config.link.secret_key_rate,
        "rate_multiplier": config.link.sim.rate_multiplier,
        "block_size": config.link.block_size,
        "max_key_count": config.link.max_key_count,
    })
    await stop.wait()
    log.info("stopping")
    for listener in listeners:
        await listener.stop()
    stats = stream.stats()
    log.info("stopped", extra={"generated_bits": stats.generated_bits,
                               "dropped_bits": stats.dropped_bits,
                               "delivered_bits": stats.delivered_bits})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    config = load_or_exit(PROG, load_sim_config, args.config, args.check_config)
    kmelog.configure("qkdsim", config.link.id, config.log_level)
    log = logging.getLogger("kmstn.qkdsim")
    return asyncio.run(_run(config, log))


if __name__ == "__main__":
    sys.exit(main())
