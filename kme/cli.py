"""``kmstn``: the node operator's commands (configuration, routes, links).

    kmstn config check --node node.toml | --topology topology.toml
    kmstn config split --topology topology.toml --out DIR   one node file per KMSTN
    kmstn route --config node.toml SAE_ID        where a key for SAE_ID goes, and why
    kmstn link --config node.toml LINK up|down [--cost C]
    kmstn topology --config node.toml            the graph this node learned, as JSON

``route`` prints the path with each hop's cost terms (what each end of the
link announced: configured cost, configured and measured key rate, key
stock). ``topology`` prints what routing uses (every link, up or down, and
who holds it down) and, on a node with link state, every record it holds
(origin, sequence, age, signature status, where it came from, its links)
and the records it refused lately (who sent them, and why).

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
from pathlib import Path
from typing import Any, TypeAlias

from kme.acks import kind_from_proto
from kme.channels import internal_channel
from kme.config import EX_CONFIG, ConfigError, NodeConfig, load_node_config, load_topology
from kme.config.split import dump_toml, split_topology_file
from kme.errors import KmstnError
from kme.rpc.v1 import linkstate_pb2, routing_pb2
from routing.client import RoutingClient

__all__ = ["Subcommands", "main", "register", "run"]

# What ``ArgumentParser.add_subparsers`` returns; argparse gives it no public name.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _routing(config: NodeConfig) -> RoutingClient:
    return RoutingClient(internal_channel(config, "routing"), timeout=5.0)


def cmd_config_check(args: argparse.Namespace) -> int:
    if args.node:
        cfg = load_node_config(args.node)
        if cfg.topology.source == cfg.source:
            print(f"{cfg.source}: valid node file for {cfg.node_id} ({len(cfg.topology.kmstns) - 1}"
                  f" neighbours, {len(list(cfg.topology.links_of(cfg.node_id)))} links, "
                  f"link state {'on' if cfg.linkstate else 'off'})")
        else:
            print(f"{cfg.source}: valid node file for {cfg.node_id} "
                  f"(topology {cfg.topology.source}: {len(cfg.topology.kmstns)} KMSTNs)")
    else:
        topo = load_topology(args.topology)
        print(f"{topo.source}: valid topology {topo.name!r}: {len(topo.kmstns)} KMSTNs, "
              f"{len(topo.links)} links, {len(topo.saes)} SAEs")
    return 0


def cmd_config_split(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for node, tables in split_topology_file(Path(args.topology)).items():
        doc = {"node": node, "data_dir": f"data/{node}", **tables,
               "tls": {"ca": "certs/ca.pem", "cert": f"certs/{node}.pem",
                       "key": f"certs/{node}.key"},
               "linkstate": {"key": f"linkstate/{node}.key", "cert": f"linkstate/{node}.pem",
                             "ca": "linkstate/ca.pem"}}
        path = out / f"{node}.toml"
        path.write_text(dump_toml(doc, header=(
            f"Node file of {node}, split from {args.topology}: this node, its neighbours, "
            "its links\nand its SAEs. Put its certificates where [tls] and [linkstate] say.")))
        print(path)
    return 0


def _announced(link: linkstate_pb2.AnnouncedLink) -> dict[str, Any]:
    out: dict[str, Any] = {"link": link.link_id, "to": link.neighbour_node_id,
                           "kind": kind_from_proto(link.kind), "up": link.up,
                           "cost": link.cost, "configured_cost": link.configured_cost}
    if out["kind"] == "qkd":
        out.update(nominal_rate_bps=link.nominal_rate_bps,
                   measured_rate_bps=link.measured_rate_bps or None,
                   stored_keys=link.stored_keys, max_keys=link.max_keys)
    if not link.up:
        out["down_reason"] = link.down_reason
    return out


def _hop(h: routing_pb2.Hop) -> dict[str, Any]:
    out: dict[str, Any] = {"from": h.from_node_id, "to": h.to_node_id, "link": h.link_id,
                           "kind": kind_from_proto(h.kind), "cost": h.cost}
    if h.ends:
        # The cost is the lower of what the two ends announce (routing.lsdb).
        out["announced_by"] = {e.node_id: _announced(e.link) for e in h.ends}
    return out


def cmd_route(args: argparse.Namespace) -> int:
    route = _routing(load_node_config(args.config)).route(args.sae)
    print(json.dumps({
        "destination": route.destination_node_id,
        "path": list(route.path),
        "hops": [_hop(h) for h in route.hops],
        "total_cost": route.total_cost,
        "topology_version": route.topology_version,
    }, indent=2))
    return 0


def cmd_link(args: argparse.Namespace) -> int:
    _routing(load_node_config(args.config)).set_link_state(args.link, args.state == "up",
                                                           args.cost)
    print(f"{args.link}: {args.state}")
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    view = _routing(load_node_config(args.config)).link_state_database()
    out: dict[str, Any] = {
        "self": view.self_node_id,
        "mode": view.mode,
        "version": view.version,
        "links": [{"id": link.link_id, "a": link.a_node_id, "b": link.b_node_id,
                   "kind": kind_from_proto(link.kind), "up": link.up, "cost": link.cost,
                   **({"overridden": True} if link.overridden else {})}
                  for link in view.links],
    }
    if view.mode == "learned":
        out["digest"] = view.digest
        out["records"] = [{
            "origin": e.record.origin_node_id, "sequence": e.record.sequence,
            "age_s": round(e.age_seconds, 1), "signature": e.signature,
            "received_from": e.received_from or "(own)",
            "saes": list(e.record.sae_ids),
            "links": [_announced(link) for link in e.record.links],
            **({"foreign": {f.node_id: list(f.sae_ids) for f in e.record.foreign}}
               if e.record.foreign else {}),
        } for e in view.entries]
        out["refused"] = [{"from": r.from_node_id, "origin": r.origin_node_id,
                           "sequence": r.sequence, "reason": r.reason,
                           "seconds_ago": round(r.seconds_ago, 1), "count": r.count}
                          for r in view.refused]
    print(json.dumps(out, indent=2))
    return 0


def add_config(sub: Subcommands) -> None:
    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a node or topology file")
    which = check.add_mutually_exclusive_group(required=True)
    which.add_argument("--node")
    which.add_argument("--topology")
    check.set_defaults(func=cmd_config_check)
    split = cfg_sub.add_parser("split", help="cut a topology file into one node file per KMSTN")
    split.add_argument("--topology", required=True)
    split.add_argument("--out", required=True, help="directory for <node>.toml files")
    split.set_defaults(func=cmd_config_split)


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
    topo = sub.add_parser("topology", help="the graph this node learned, with every record")
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
