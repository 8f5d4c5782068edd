"""``kmstn``: the operator's command line, with the lab commands.

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
    kmstn bench keyrate|delay|concurrency|resources|roundtrip|scarcity|fairness|all --state DIR
    kmstn dashboard --state DIR [--port 8090]    a live picture of a lab federation
    kmstn trace --state DIR KEY_ID               one key's path through a lab's logs

The first four are the node operator's (``kme.cli``); the others run
federations on one machine. Exit codes: 0 success, 1 a service refused the
request or a federation failed, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kme import cli as node_cli
from kme.cli import Subcommands
from kme.config import LOG_LEVELS, load_topology
from lab.bench import run_bench
from lab.dashboard import serve
from lab.federation import Federation, FederationError, read_node_settings
from lab.federation_status import render_status
from lab.logs import trace_key
from lab.pki import CertificateAuthority, issue_for_topology
from lab.rotate import add_rotate_parser
from lab.saeclient import SaeClient

__all__ = ["build_parser", "main"]


def cmd_pki(args: argparse.Namespace) -> int:
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
    state = Path(args.state)
    if args.federation_command == "up":
        fed = Federation(Path(args.topology), state, delivery=args.delivery,
                         log_level=args.log_level, qkd_rate_scale=args.qkd_rate_scale,
                         node_settings=read_node_settings(args.node_settings))
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
    print(render_status(fed))
    return 0


def cmd_sae(args: argparse.Namespace) -> int:
    client = SaeClient.from_manifest(Path(args.state) / "federation.json", args.sae)
    if args.sae_command == "get-key":
        status, body = client.enc_keys(args.slave, args.number, args.size)
    else:
        status, body = client.dec_keys(args.master, args.key_ids)
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    return run_bench(args.bench_command, Path(args.state), args)


def add_pki(sub: Subcommands) -> None:
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


def add_federation(sub: Subcommands) -> None:
    fed = sub.add_parser("federation", help="run a whole federation on this machine")
    fed_sub = fed.add_subparsers(dest="federation_command", required=True)
    up = fed_sub.add_parser("up", help="start everything, wait until healthy, return")
    up.add_argument("--topology", required=True)
    up.add_argument("--delivery", choices=("confirmed", "concurrent"), default="confirmed")
    up.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    up.add_argument("--timeout", type=float, default=180.0)
    up.add_argument("--qkd-rate-scale", type=float, default=1.0,
                    help="multiply every emulated QKD link's key rate (e.g. 1000: not limiting)")
    up.add_argument("--node-settings", default=None,
                    help='TOML of node-file tables per node ("*" for all), e.g. '
                         'examples/supply-stocks.toml')
    restart = fed_sub.add_parser(
        "restart", help="stop one service and start it again (labs: test recovery)")
    restart.add_argument("service", help="as in pids.json, e.g. KMSTN2/relay or QKD-1-2/qkdsim")
    restart.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
    for name in ("up", "status", "down", "restart"):
        p = {"up": up, "restart": restart}.get(name) or fed_sub.add_parser(name)
        p.add_argument("--state", required=True)
        p.set_defaults(func=cmd_federation)


def add_sae(sub: Subcommands) -> None:
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
    add_rotate_parser(sae_sub)


def add_bench(sub: Subcommands) -> None:
    bench = sub.add_parser("bench", help="measure a running federation (paper section VI)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, text in (("keyrate", "Table III: back-to-back requests per ordered pair"),
                       ("delay", "Table IV: latency and jitter"),
                       ("concurrency", "Fig. 7: simultaneous requests to one KMSTN"),
                       ("resources", "CPU seconds and peak RSS of every process"),
                       ("roundtrip", "enc_keys + dec_keys pairs per second at concurrency 1"),
                       ("scarcity", "Fig. 7 with empty device stores: waits, 503 + Retry-After"),
                       ("fairness", "SAEs of one node competing for one link: Jain's index"),
                       ("all", "keyrate, delay, concurrency and resources")):
        p = bench_sub.add_parser(name, help=text)
        p.add_argument("--state", required=True)
        p.add_argument("--out", help="directory for CSV and JSON results")
        p.add_argument("--requests", type=int, default=100)
        p.add_argument("--pairs", help="comma-separated MASTER:SLAVE SAE pairs")
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--seconds", type=float, default=0,
                       help="keyrate: run each pair this long instead of --requests; "
                            "fairness: length of each phase (default 60)")
        p.set_defaults(func=cmd_bench)


def cmd_dashboard(args: argparse.Namespace) -> int:
    return serve(Path(args.state), args.host, args.port)


def cmd_trace(args: argparse.Namespace) -> int:
    lines = trace_key(Path(args.state) / "logs", args.key_id)
    for line in lines:
        r = line.record
        extra = {k: v for k, v in r.items()
                 if k not in ("ts", "level", "service", "node", "msg", "request_id")}
        print(f"{r.get('ts', '')}  {r.get('node', '?'):<8} {r.get('service', '?'):<16} "
              f"{r.get('request_id', '-')!s:<36}  {r.get('msg', '')}  "
              f"{json.dumps(extra, separators=(',', ':'))}")
    if not lines:
        print(f"no log line of {args.state} names key {args.key_id}", file=sys.stderr)
        return 1
    return 0


def add_dashboard(sub: Subcommands) -> None:
    dash = sub.add_parser("dashboard", help="serve a live picture of a lab federation")
    dash.add_argument("--state", required=True)
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=8090)
    dash.set_defaults(func=cmd_dashboard)


def add_trace(sub: Subcommands) -> None:
    trace = sub.add_parser("trace", help="print one key ID's path from a lab federation's logs")
    trace.add_argument("--state", required=True)
    trace.add_argument("key_id")
    trace.set_defaults(func=cmd_trace)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``kmstn`` command: the node-operator commands, then the lab's."""
    parser, sub = node_cli.new_parser(__doc__.splitlines()[0])
    node_cli.register(sub)
    for add in (add_pki, add_federation, add_sae, add_bench, add_dashboard, add_trace):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return node_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
