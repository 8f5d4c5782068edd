"""``kmstn``: the node operator's commands (configuration, routes, links).

    kmstn config check --node node.toml | --topology topology.toml
    kmstn route --config node.toml SAE_ID        where would a key for SAE_ID go
    kmstn link --config node.toml LINK up|down [--cost C]
    kmstn topology --config node.toml            links and their state, as JSON

These are what an operator runs on a production node. :func:`register` adds
them to any ``kmstn`` parser: ``lab.cli`` builds the full ``kmstn`` command
from them and the lab commands (federation, pki, sae, bench);
``python -m kme`` is these commands alone. :func:`run` is the one place
that turns errors into exit codes: 0 success, 1 a service refused the
request, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TypeAlias

from kme.channels import internal_channel
from kme.config import EX_CONFIG, ConfigError, NodeConfig, load_node_config, load_topology
from kme.errors import KmstnError
from routing.client import RoutingClient

__all__ = ["Subcommands", "main", "register", "run"]

# What ``ArgumentParser.add_subparsers`` returns; argparse gives it no public name.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _routing(config: NodeConfig) -> RoutingClient:
    return RoutingClient(internal_channel(config, "routing"), timeout=5.0)


def cmd_config_check(args: argparse.Namespace) -> int:
    if args.node:
        cfg = load_node_config(args.node)
        print(f"{cfg.source}: valid node file for {cfg.node_id} "
              f"(topology {cfg.topology.source}: {len(cfg.topology.kmstns)} KMSTNs)")
    else:
        topo = load_topology(args.topology)
        print(f"{topo.source}: valid topology {topo.name!r}: {len(topo.kmstns)} KMSTNs, "
              f"{len(topo.links)} links, {len(topo.saes)} SAEs")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    route = _routing(load_node_config(args.config)).route_to_sae(args.sae)
    print(json.dumps({
        "destination": route.destination,
        "path": list(route.path),
        "hops": [{"from": h.from_node, "to": h.to_node, "link": h.link_id, "kind": h.kind,
                  "cost": h.cost} for h in route.hops],
        "total_cost": route.total_cost,
        "topology_version": route.version,
    }, indent=2))
    return 0


def cmd_link(args: argparse.Namespace) -> int:
    _routing(load_node_config(args.config)).set_link_state(args.link, args.state == "up",
                                                           args.cost)
    print(f"{args.link}: {args.state}")
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    snap = _routing(load_node_config(args.config)).topology()
    print(json.dumps({
        "self": snap.self_node_id,
        "version": snap.version,
        "links": [{"id": link.link_id, "a": link.a_node_id, "b": link.b_node_id,
                   "up": link.up, "cost": link.cost} for link in snap.links],
    }, indent=2))
    return 0


def add_config(sub: Subcommands) -> None:
    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a node or topology file")
    which = check.add_mutually_exclusive_group(required=True)
    which.add_argument("--node")
    which.add_argument("--topology")
    check.set_defaults(func=cmd_config_check)


def add_route(sub: Subcommands) -> None:
    route = sub.add_parser("route", help="ask this node's routing service for a route")
    route.add_argument("--config", required=True)
    route.add_argument("sae")
    route.set_defaults(func=cmd_route)


def add_link(sub: Subcommands) -> None:
    link = sub.add_parser("link", help="take a link down or up at run time")
    link.add_argument("--config", required=True)
    link.add_argument("link")
    link.add_argument("state", choices=("up", "down"))
    link.add_argument("--cost", type=float)
    link.set_defaults(func=cmd_link)


def add_topology(sub: Subcommands) -> None:
    topo = sub.add_parser("topology", help="this node's view of the links")
    topo.add_argument("--config", required=True)
    topo.set_defaults(func=cmd_topology)


def register(sub: Subcommands) -> None:
    """Add every node-operator command to ``sub``."""
    for add in (add_config, add_route, add_link, add_topology):
        add(sub)


def new_parser(description: str) -> tuple[argparse.ArgumentParser, Subcommands]:
    """An empty ``kmstn`` parser and the subcommands to fill."""
    parser = argparse.ArgumentParser(prog="kmstn", description=description)
    return parser, parser.add_subparsers(dest="command", required=True)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; errors become exit codes."""
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"kmstn: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KmstnError as exc:
        print(f"kmstn: {exc.code.name}: {exc.public}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kme``: the node-operator commands only."""
    parser, sub = new_parser(__doc__.splitlines()[0])
    register(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
