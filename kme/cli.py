"""``kmstn``: the operator's command line.

    kmstn config check --node node.toml | --topology topology.toml
    kmstn route --config node.toml SAE_ID        where would a key for SAE_ID go
    kmstn link --config node.toml LINK up|down [--cost C]
    kmstn topology --config node.toml            links and their state, as JSON

    kmstn pki init --dir DIR                     a throwaway CA (labs and tests)
    kmstn pki issue --dir DIR --topology FILE    certificates for a topology
    kmstn federation up|status|down|restart --state DIR [--topology FILE]
    kmstn sae get-key --state DIR --sae SAE --slave SLAVE [--number N] [--size BITS]
    kmstn sae get-key-with-ids --state DIR --sae SAE --master MASTER KEY_ID...
    kmstn sae rotate --state DIR --sae SAE --peer PEER --role master|slave ...
    kmstn bench keyrate|delay|concurrency|resources --state DIR

Exit codes: 0 success, 1 a service refused the request or a federation
failed, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from kme.config import EX_CONFIG, ConfigError, NodeConfig, load_node_config, load_topology
from kme.errors import KmstnError

__all__ = ["main"]


def _routing(config: NodeConfig):  # type: ignore[no-untyped-def]
    from kme.channels import internal_channel
    from routing.client import RoutingClient

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


def cmd_pki(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kme.pki import CertificateAuthority, issue_for_topology

    directory = Path(args.dir)
    if args.pki_command == "init":
        if (directory / "ca.pem").exists():
            print(f"{directory / 'ca.pem'}: a CA already exists; keeping it")
            return 0
        ca = CertificateAuthority.create(directory)
        print(f"created CA {ca.cert_path}")
        return 0
    ca = CertificateAuthority.load(directory)
    if args.topology:
        issued = issue_for_topology(ca, load_topology(args.topology), directory / "certs")
    else:
        issued = {args.name: ca.issue(args.name, directory / "certs", ips=tuple(args.ip),
                                      dns=tuple(args.dns))}
    for name, item in sorted(issued.items()):
        print(f"{name}\t{item.cert}\t{item.key}")
    return 0


def cmd_federation(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kme.federation import Federation, FederationError

    state = Path(args.state)
    if args.federation_command == "up":
        fed = Federation(Path(args.topology), state, delivery=args.delivery,
                         log_level=args.log_level, qkd_rate_scale=args.qkd_rate_scale)
        try:
            manifest = fed.up(timeout=args.timeout, progress=print)
        except FederationError as exc:
            print(f"kmstn: federation failed: {exc}", file=sys.stderr)
            return 1
        print(f"federation {manifest['name']!r} is up: {len(manifest['kmstns'])} KMSTNs; "
              f"manifest {fed.manifest_path}")
        return 0
    fed = Federation(state / "topology.toml", state)
    if args.federation_command == "restart":
        try:
            fed.restart(args.service, kill=args.kill)
        except FederationError as exc:
            print(f"kmstn: restart failed: {exc}", file=sys.stderr)
            return 1
        print(f"{args.service} restarted and healthy")
        return 0
    if args.federation_command == "down":
        left = fed.down()
        if left:
            print("kmstn: still running: " + ", ".join(left), file=sys.stderr)
            return 1
        print("federation stopped; nothing left running")
        return 0
    from kme.federation_status import render_status

    print(render_status(fed))
    return 0


def cmd_sae(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kme.saeclient import SaeClient

    client = SaeClient.from_manifest(Path(args.state) / "federation.json", args.sae)
    if args.sae_command == "get-key":
        status, body = client.enc_keys(args.slave, args.number, args.size)
    else:
        status, body = client.dec_keys(args.master, args.key_ids)
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kme.bench import run_bench

    return run_bench(args.bench_command, Path(args.state), args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmstn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a node or topology file")
    which = check.add_mutually_exclusive_group(required=True)
    which.add_argument("--node")
    which.add_argument("--topology")
    check.set_defaults(func=cmd_config_check)

    route = sub.add_parser("route", help="ask this node's routing service for a route")
    route.add_argument("--config", required=True)
    route.add_argument("sae")
    route.set_defaults(func=cmd_route)

    link = sub.add_parser("link", help="take a link down or up at run time")
    link.add_argument("--config", required=True)
    link.add_argument("link")
    link.add_argument("state", choices=("up", "down"))
    link.add_argument("--cost", type=float)
    link.set_defaults(func=cmd_link)

    topo = sub.add_parser("topology", help="this node's view of the links")
    topo.add_argument("--config", required=True)
    topo.set_defaults(func=cmd_topology)

    pki = sub.add_parser("pki", help="a throwaway CA and certificates (labs and tests)")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser("init", help="create a CA in --dir")
    init.add_argument("--dir", required=True)
    issue = pki_sub.add_parser("issue", help="issue certificates")
    issue.add_argument("--dir", required=True)
    what = issue.add_mutually_exclusive_group(required=True)
    what.add_argument("--topology", help="every KMSTN, device KME and SAE of a topology")
    what.add_argument("--name", help="one certificate with this CN")
    issue.add_argument("--ip", action="append", default=[])
    issue.add_argument("--dns", action="append", default=[])
    for p in (init, issue):
        p.set_defaults(func=cmd_pki)

    fed = sub.add_parser("federation", help="run a whole federation on this machine")
    fed_sub = fed.add_subparsers(dest="federation_command", required=True)
    up = fed_sub.add_parser("up", help="start everything, wait until healthy, return")
    up.add_argument("--topology", required=True)
    up.add_argument("--delivery", choices=("confirmed", "concurrent"), default="confirmed")
    up.add_argument("--log-level", default="info",
                    choices=("debug", "info", "warning", "error"))
    up.add_argument("--timeout", type=float, default=180.0)
    up.add_argument("--qkd-rate-scale", type=float, default=1.0,
                    help="multiply every emulated QKD link's key rate (e.g. 1000: not limiting)")
    restart = fed_sub.add_parser(
        "restart", help="stop one service and start it again (labs: test recovery)")
    restart.add_argument("service", help="as in pids.json, e.g. KMSTN2/relay or QKD-1-2/qkdsim")
    restart.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
    for name in ("up", "status", "down", "restart"):
        p = {"up": up, "restart": restart}.get(name) or fed_sub.add_parser(name)
        p.add_argument("--state", required=True)
        p.set_defaults(func=cmd_federation)

    sae = sub.add_parser("sae", help="an ETSI 014 SAE client over a federation manifest")
    sae_sub = sae.add_subparsers(dest="sae_command", required=True)
    gk = sae_sub.add_parser("get-key", help="enc_keys as a master SAE")
    gk.add_argument("--slave", required=True)
    gk.add_argument("--number", type=int, default=1)
    gk.add_argument("--size", type=int)
    gi = sae_sub.add_parser("get-key-with-ids", help="dec_keys as a slave SAE")
    gi.add_argument("--master", required=True)
    gi.add_argument("key_ids", nargs="+")
    for p in (gk, gi):
        p.add_argument("--state", required=True)
        p.add_argument("--sae", required=True)
        p.set_defaults(func=cmd_sae)
    from lab.rotate import add_rotate_parser  # lab tooling (issue 14)

    add_rotate_parser(sae_sub)

    bench = sub.add_parser("bench", help="measure a running federation (paper section VI)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, text in (("keyrate", "Table III: back-to-back requests per ordered pair"),
                       ("delay", "Table IV: latency and jitter"),
                       ("concurrency", "Fig. 7: simultaneous requests to one KMSTN"),
                       ("resources", "CPU seconds and peak RSS of every process"),
                       ("all", "keyrate, delay, concurrency and resources")):
        p = bench_sub.add_parser(name, help=text)
        p.add_argument("--state", required=True)
        p.add_argument("--out", help="directory for CSV and JSON results")
        p.add_argument("--requests", type=int, default=100)
        p.add_argument("--pairs", help="comma-separated MASTER:SLAVE SAE pairs")
        p.add_argument("--rounds", type=int, default=5)
        p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"kmstn: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KmstnError as exc:
        print(f"kmstn: {exc.code.name}: {exc.public}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
