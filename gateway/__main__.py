"""``python -m gateway --config node.toml --api etsi014|etsi020``: one REST listener."""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kme import log as kmelog
from kme.config import NodeConfig, load_node_config, load_or_exit


def _app(api: str, config: NodeConfig) -> Any:
    from gateway.app import create_app
    from gateway.deps import build_edge
    from kme.server import start_metrics

    # In the process that serves requests (each Gunicorn worker, after the
    # fork): the registry is per process, so each worker has its own port.
    start_metrics(config, api, logging.getLogger(f"kmstn.gateway-{api}"),
                  tries=config.gateway.workers if api == "etsi014" else 1)
    return create_app(api, config, build_edge(config, api))  # type: ignore[arg-type]


def _raise_file_limit() -> None:
    """Open files up to the hard limit: the edge holds a descriptor per connection it caps.

    systemd's default soft limit (1024) is below what the connection caps of
    the [gateway] table can hold; the hard limit is the operator's word.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65_536
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kmstn-gateway", description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--api", required=True, choices=("etsi014", "etsi020"))
    parser.add_argument("--check-config", action="store_true")
    args = parser.parse_args(argv)
    config = load_or_exit("kmstn-gateway", load_node_config, args.config, args.check_config)
    service = f"gateway-{args.api}"
    kmelog.configure(service, config.node_id, config.log_level)
    log = logging.getLogger(f"kmstn.{service}")
    _raise_file_limit()
    try:
        if args.api == "etsi020":
            from gateway.serve020 import Etsi020Server

            Etsi020Server(config, _app("etsi020", config)).serve_until_signal()
        else:
            from gateway.serve014 import Etsi014Server

            def load() -> Any:
                kmelog.configure(service, config.node_id, config.log_level)
                return _app("etsi014", config)

            log.info("listening", extra={
                "address": f"{config.node.host}:{config.node.etsi014_port}"})
            Etsi014Server(config, load, on_exit=lambda: log.info("stopped")).run()
    except OSError as exc:
        log.error("cannot start", extra={"error": str(exc)})
        print(f"kmstn-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
