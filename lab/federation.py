"""Run a whole federation on one machine: the engine behind ``kmstn federation``.

``up`` prepares a state directory and starts, for every KMSTN of the
topology, its routing, keyvault (with its swtpm), relay and both gateway
processes, each KMSTN on its own loopback address; and for every QKD link its
emulated device pair (lab.qkdsim). It waits until every service answers its
health check and every node's routes reach every SAE (link state has
converged), then writes ``federation.json`` and returns, leaving the
processes running in their own process groups. If anything fails to start,
everything started so far is stopped and the error names the service, why,
and its log file: there is never half a federation left behind.

The topology file is the lab's convenience only: it is split into one
**per-node file** per KMSTN (kme.config.split), naming that node, its
neighbours, its links and its SAEs, nothing further; every node process is
started from its node file alone and learns the rest of the federation from
signed link state (its ``[linkstate]`` key and certificate come from the
lab's ML-DSA-65 link-state CA). The emulators read their link from the node
file of the link's first end. Lab tools (the manifest, the dashboard, the
benchmarks) still read the topology, as an operator who sees the whole lab.

State directory::

    pki/            throwaway CA and one certificate per KMSTN, device KME and SAE;
                    pki/linkstate/: the link-state CA and each KMSTN's ML-DSA-65 key
    topology.toml   the topology the lab was built from (lab tools only)
    nodes/<id>/     node.toml (per-node) and data/ (keyvault database, sealed key,
                    swtpm state)
    run/<id>/       the node's unix sockets (short paths)
    sim/<link>.toml emulator configuration of each QKD link
    logs/           one log per process (JSON lines)
    pids.json       what is running, for status and down
    federation.json the manifest: CA, ETSI 014/020 URLs, SAE certificates, and
                    each service's metrics URL (``metrics``: service name -> URL)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kme.channels import internal_channel
from kme.config import (
    DEFAULT_METRICS_PORTS,
    NodeConfig,
    QkdLink,
    TlsFiles,
    Topology,
    load_node_config,
    load_topology,
)
from kme.config.reader import read_toml
from kme.config.split import dump_toml, neighbourhoods
from kme.errors import KmstnError
from kme.pqtls import PeerHttpClient
from lab.pki import CertificateAuthority, Issued, LinkStateAuthority, issue_for_topology
from lab.qkdsim.config import sim_healthy, write_sim_config
from routing.client import RoutingClient

__all__ = ["Federation", "FederationError", "ServiceSpec", "group_alive", "group_members",
           "read_node_settings"]

GRPC_SERVICES: Final[tuple[Literal["routing", "keyvault", "relay"], ...]] = (
    "routing", "keyvault", "relay")


class FederationError(Exception):
    """A federation could not be brought up; names the service, why, and its log."""

    def __init__(self, service: str, reason: str, log: Path | None = None) -> None:
        self.service, self.reason, self.log = service, reason, log
        where = f" (log: {log})" if log else ""
        super().__init__(f"{service}: {reason}{where}")


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    log: Path
    healthy: Callable[[], bool]


def _grpc_healthy(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=1)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def _https_healthy(host: str, port: int, ca: Path, cert: Issued, path: str = "/healthz",
                   pq: bool = False, expected_peer: str = "") -> bool:
    """GET a health path over mutual TLS; pq selects the X25519MLKEM768 client."""
    try:
        if pq:
            client = PeerHttpClient(TlsFiles(ca, cert.cert, cert.key))
            try:
                return client.request("GET", f"https://{host}:{port}{path}", expected_peer,
                                      timeout=2).status == 200
            finally:
                client.close()
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
        with socket.create_connection((host, port), timeout=2) as raw, \
                ctx.wrap_socket(raw) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                        .encode())
            return tls.recv(64).startswith(b"HTTP/1.1 200")
    except Exception:
        return False


def read_node_settings(path: str | Path | None) -> dict[str, dict[str, dict[str, Any]]]:
    """Node-file tables to add per node: ``[KMSTN1.supply]``, ``["*".gateway]``."""
    if path is None:
        return {}
    with Path(path).open("rb") as fh:
        doc = tomllib.load(fh)
    for node, tables in doc.items():
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            raise FederationError(str(path), f"{node}: must hold tables, e.g. [{node}.supply]")
    return doc


class Federation:
    def __init__(self, topology_path: Path, state_dir: Path, delivery: str = "confirmed",
                 log_level: str = "info", qkd_rate_scale: float = 1.0,
                 linkstate: dict[str, Any] | None = None,
                 node_settings: dict[str, dict[str, dict[str, Any]]] | None = None) -> None:
        self.state = state_dir.resolve()
        self.source_topology = topology_path.resolve()
        self.delivery = delivery
        self.log_level = log_level
        # Multiplies every emulated QKD link's key rate (1 = the topology's rates).
        self.qkd_rate_scale = qkd_rate_scale
        # Extra [linkstate] settings for every node file (timers).
        self.linkstate = dict(linkstate or {})
        # Extra node-file tables per node ID, "*" for every node (read_node_settings).
        self.node_settings = node_settings or {}

    # -- paths ---------------------------------------------------------------------

    @property
    def topology_path(self) -> Path:
        return self.state / "topology.toml"

    @property
    def pids_path(self) -> Path:
        return self.state / "pids.json"

    @property
    def manifest_path(self) -> Path:
        return self.state / "federation.json"

    def node_file(self, node: str) -> Path:
        return self.state / "nodes" / node / "node.toml"

    # -- preparation -----------------------------------------------------------------

    def prepare(self) -> tuple[Topology, dict[str, Issued], CertificateAuthority]:
        self.state.mkdir(parents=True, exist_ok=True)
        if self.source_topology != self.topology_path:
            shutil.copyfile(self.source_topology, self.topology_path)
        topology = load_topology(self.topology_path)
        pki_dir = self.state / "pki"
        ca = (CertificateAuthority.load(pki_dir) if (pki_dir / "ca.pem").exists()
              else CertificateAuthority.create(pki_dir))
        certs = issue_for_topology(ca, topology, pki_dir / "certs")
        signing = LinkStateAuthority.load_or_create(pki_dir / "linkstate")
        tables = neighbourhoods(read_toml(self.topology_path))
        for node in topology.kmstns.values():
            if node.kind != "kmstn":
                continue
            run = self.state / "run" / node.id
            run.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = signing.issue(node.id)
            doc: dict[str, Any] = {
                "node": node.id,
                "data_dir": self.state / "nodes" / node.id / "data",
                **tables[node.id],
                **self._with_settings(node.id, {
                    "tls": {"ca": ca.cert_path, "cert": certs[node.id].cert,
                            "key": certs[node.id].key},
                    "services": {s: f"unix:{run / (s + '.sock')}" for s in GRPC_SERVICES},
                    "log": {"level": self.log_level},
                    "gateway": {"delivery": self.delivery},
                    "keyvault": {"tpm": "swtpm"},
                    # Ephemeral metrics ports (several labs may share 127.0.0.x);
                    # the launcher reads each one from its log into federation.json.
                    "metrics": {f"{s}_port": 0 for s in DEFAULT_METRICS_PORTS},
                    "linkstate": {"key": key.key, "cert": key.cert, "ca": signing.cert_path,
                                  **self.linkstate},
                }),
            }
            path = self.node_file(node.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump_toml(doc, header=(
                f"Node file of {node.id}, cut from {self.source_topology.name} by the lab "
                "launcher:\nthis node, its neighbours, its links and its SAEs; the rest is "
                "learned\nfrom signed link state.")))
        for link in topology.qkd_links:
            self._write_sim_config(link, ca, certs)
        return topology, certs, ca

    def _with_settings(self, node: str, tables: dict[str, dict[str, Any]]
                       ) -> dict[str, dict[str, Any]]:
        for key in ("*", node):
            for name, table in self.node_settings.get(key, {}).items():
                tables[name] = {**tables.get(name, {}), **table}
        return tables

    def _write_sim_config(self, link: QkdLink, ca: CertificateAuthority,
                          certs: dict[str, Issued]) -> Path:
        if link.alice is None or link.bob is None:
            raise FederationError(link.id, "a QKD link needs both device endpoints")
        return write_sim_config(
            self.state / "sim" / f"{link.id}.toml", node_file=self.node_file(link.a),
            link=link.id,
            ca=ca.cert_path, alice=certs[link.alice.kme_id], bob=certs[link.bob.kme_id],
            log_level=self.log_level, rate_scale=self.qkd_rate_scale)

    def services(self, topology: Topology, certs: dict[str, Issued],
                 ca: CertificateAuthority) -> list[list[ServiceSpec]]:
        """Start order in waves: devices; then routing, keyvault, relay; then gateways."""
        logs = self.state / "logs"
        py = sys.executable
        devices: list[ServiceSpec] = []
        for link in topology.qkd_links:
            sim_cfg = self.state / "sim" / f"{link.id}.toml"
            devices.append(ServiceSpec(
                f"{link.id}/qkdsim", [py, "-m", "lab.qkdsim", "--config", str(sim_cfg)],
                logs / f"{link.id}-qkdsim.log",
                functools.partial(sim_healthy, link, ca.cert_path, certs)))
        core: list[ServiceSpec] = []
        edge: list[ServiceSpec] = []
        for node in topology.kmstns.values():
            if node.kind != "kmstn":
                continue
            node_path = self.node_file(node.id)
            cfg = load_node_config(node_path)
            for svc in GRPC_SERVICES:
                target = cfg.endpoint(svc).grpc_target
                core.append(ServiceSpec(
                    f"{node.id}/{svc}", [py, "-m", svc, "--config", str(node_path)],
                    logs / f"{node.id}-{svc}.log", functools.partial(_grpc_healthy, target)))
            cert = certs[node.id]
            edge.append(ServiceSpec(
                f"{node.id}/gateway014",
                [py, "-m", "gateway", "--api", "etsi014", "--config", str(node_path)],
                logs / f"{node.id}-gateway014.log",
                functools.partial(_https_healthy, node.host, node.etsi014_port, ca.cert_path,
                                  cert)))
            edge.append(ServiceSpec(
                f"{node.id}/gateway020",
                [py, "-m", "gateway", "--api", "etsi020", "--config", str(node_path)],
                logs / f"{node.id}-gateway020.log",
                functools.partial(_https_healthy, node.host, node.etsi020_port, ca.cert_path,
                                  cert, pq=True, expected_peer=node.id)))
        return [devices, core, edge]

    # -- lifecycle -------------------------------------------------------------------

    def _load_pids(self) -> dict[str, dict[str, Any]]:
        if not self.pids_path.exists():
            return {}
        data: dict[str, dict[str, Any]] = json.loads(self.pids_path.read_text())
        return data

    def _save_pids(self, pids: dict[str, dict[str, Any]]) -> None:
        tmp = self.pids_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids, indent=2))
        tmp.replace(self.pids_path)

    def up(self, timeout: float = 120.0, progress: Callable[[str], None] | None = None
           ) -> dict[str, Any]:
        """Start everything, wait until healthy, write and return the manifest."""
        say = progress or (lambda _msg: None)
        if any(_alive(p["pgid"]) for p in self._load_pids().values()):
            raise FederationError("federation", f"already running in {self.state}; "
                                  "run 'kmstn federation down' first")
        topology, certs, ca = self.prepare()
        pids: dict[str, dict[str, Any]] = {}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for wave in self.services(topology, certs, ca):
                for spec in wave:
                    procs[spec.name] = proc = self._spawn(spec)
                    pids[spec.name] = {"pid": proc.pid, "pgid": proc.pid,
                                       "log": str(spec.log), "argv": spec.argv}
                self._save_pids(pids)
                self._wait_healthy(wave, procs, timeout)
                say(f"started {len(wave)} services: "
                    + ", ".join(sorted({s.name.split('/')[1] for s in wave})))
            started = time.monotonic()
            self.wait_converged(topology, timeout)
            say(f"link state converged: every node routes to every SAE "
                f"({time.monotonic() - started:.1f} s)")
        except BaseException:
            self._stop(pids)
            self.pids_path.unlink(missing_ok=True)
            raise
        manifest = self._manifest(topology, certs, ca)
        manifest["metrics"] = self._metrics_urls(pids)
        self.manifest_path.write_text(json.dumps(manifest, indent=2))
        return manifest

    def _spawn(self, spec: ServiceSpec) -> subprocess.Popen[bytes]:
        """Start one service in its own process group, appending to its log (mode 0600)."""
        spec.log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(spec.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a log made by an older launcher, too
        with os.fdopen(fd, "ab") as out:
            return subprocess.Popen(  # noqa: S603 - our own argv
                spec.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.state, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def restart(self, name: str, *, kill: bool = False, timeout: float = 60.0) -> None:
        """Stop one running service (SIGTERM, or SIGKILL with ``kill``) and start it again.

        For labs and tests of recovery: the rest of the federation keeps
        running. Returns once the new process answers its health check and
        link state has converged again (every node routes to every SAE).
        """
        self.stop_service(name, kill=kill)
        self.start_service(name, timeout=timeout)

    def stop_service(self, name: str, *, kill: bool = False) -> None:
        """Stop one running service (SIGTERM, or SIGKILL with ``kill``); labs inject faults so."""
        pids = self._load_pids()
        if name not in pids:
            raise FederationError(name, "no such service here; known: " + ", ".join(pids))
        if kill:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pids[name]["pgid"], signal.SIGKILL)
        if self._stop({name: pids[name]}):
            raise FederationError(name, "would not stop")

    def start_service(self, name: str, *, timeout: float = 60.0, converge: bool = True) -> None:
        """Start a stopped service again; with ``converge``, wait for link state as well."""
        pids = self._load_pids()
        if name not in pids:
            raise FederationError(name, "no such service here; known: " + ", ".join(pids))
        topology = load_topology(self.topology_path)
        ca = CertificateAuthority.load(self.state / "pki")
        certs = issue_for_topology(ca, topology, self.state / "pki" / "certs")
        spec = next(s for wave in self.services(topology, certs, ca) for s in wave
                    if s.name == name)
        proc = self._spawn(spec)
        pids[name] = {"pid": proc.pid, "pgid": proc.pid, "log": str(spec.log),
                      "argv": spec.argv}
        self._save_pids(pids)
        self._wait_healthy([spec], {name: proc}, timeout)
        if self.manifest_path.exists():  # the new process has a new metrics port
            manifest = json.loads(self.manifest_path.read_text())
            manifest["metrics"] = self._metrics_urls(pids)
            self.manifest_path.write_text(json.dumps(manifest, indent=2))
        if converge:
            self.wait_converged(topology, timeout)

    # -- link state ------------------------------------------------------------------

    def converged(self, topology: Topology) -> tuple[bool, str]:
        """Whether every node routes to every SAE of the lab and all databases agree.

        Asks each node's routing service (Routing.Route for every SAE of
        another node, and the database digest). A lab knows the whole
        topology; the nodes do not, so this is the lab checking what they
        learned.
        """
        digests: set[str] = set()
        for node, k in topology.kmstns.items():
            if k.kind != "kmstn":
                continue
            cfg = load_node_config(self.node_file(node))
            channel = internal_channel(cfg, "routing")
            try:
                client = RoutingClient(channel, timeout=2.0)
                digests.add(client.link_state_database().digest)
                for sae, at in topology.saes.items():
                    if at != node:
                        client.route_to_sae(sae)
            except KmstnError as exc:
                return False, f"{node}: {exc.public}"
            finally:
                channel.close()
        if len(digests) > 1:
            return False, f"link-state databases differ ({len(digests)} digests)"
        return True, ""

    def wait_converged(self, topology: Topology, timeout: float = 60.0,
                       settle_s: float = 1.0) -> None:
        """Wait until :meth:`converged` holds twice, ``settle_s`` apart (a fault just
        injected has had time to be seen); FederationError after ``timeout``."""
        deadline = time.monotonic() + timeout
        first: float | None = None
        why = ""
        while time.monotonic() < deadline:
            ok, why = self.converged(topology)
            now = time.monotonic()
            if not ok:
                first = None
            elif first is None:
                first = now
            elif now - first >= settle_s:
                return
            time.sleep(0.2)
        raise FederationError("link state", f"not converged after {timeout:.0f} s: {why}")

    @staticmethod
    def _metrics_urls(pids: dict[str, dict[str, Any]]) -> dict[str, str]:
        from lab.logs import metrics_url

        urls = {name: metrics_url(Path(info["log"])) for name, info in pids.items()}
        return {name: url for name, url in urls.items() if url}

    def _wait_healthy(self, wave: Iterable[ServiceSpec],
                      procs: dict[str, subprocess.Popen[bytes]], timeout: float) -> None:
        pending = {s.name: s for s in wave}
        deadline = time.monotonic() + timeout
        while pending:
            for name, spec in list(pending.items()):
                code = procs[name].poll()
                if code is not None:
                    tail = _tail(spec.log)
                    raise FederationError(name, f"exited with code {code}: {tail}", spec.log)
                if spec.healthy():
                    del pending[name]
            if pending and time.monotonic() > deadline:
                name, spec = next(iter(pending.items()))
                raise FederationError(name, f"not healthy after {timeout:.0f} s: "
                                      f"{_tail(spec.log)}", spec.log)
            if pending:
                time.sleep(0.1)

    def _manifest(self, topology: Topology, certs: dict[str, Issued],
                  ca: CertificateAuthority) -> dict[str, Any]:
        return {
            "name": topology.name,
            "ca": str(ca.cert_path),
            "topology": str(self.topology_path),
            "kmstns": [{"id": k.id, "etsi014_url": k.etsi014_url, "etsi020_url": k.etsi020_url}
                       for k in topology.kmstns.values() if k.kind == "kmstn"],
            "saes": [{"id": s, "kmstn": n, "cert": str(certs[s].cert), "key": str(certs[s].key)}
                     for s, n in topology.saes.items()],
        }

    def down(self, timeout: float = 20.0) -> list[str]:
        """Stop everything this state directory started; return what would not stop."""
        pids = self._load_pids()
        left = self._stop(pids, timeout)
        if not left:
            self.pids_path.unlink(missing_ok=True)
            self.manifest_path.unlink(missing_ok=True)
        return left

    def _stop(self, pids: dict[str, dict[str, Any]], timeout: float = 20.0) -> list[str]:
        # Gateways first, devices last: the reverse of the start order.
        order = list(reversed(list(pids.items())))
        for _, info in order:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info["pgid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(i["pgid"]) for _, i in order):
            _reap()
            time.sleep(0.1)
        for _, info in order:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info["pgid"], signal.SIGKILL)
        time.sleep(0.2)
        _reap()
        return [name for name, info in order if _alive(info["pgid"])]

    def status(self) -> dict[str, bool]:
        """Service name -> whether its process group is alive."""
        return {name: _alive(info["pgid"]) for name, info in self._load_pids().items()}

    def configs(self) -> dict[str, NodeConfig]:
        topology = load_topology(self.topology_path)
        return {n: load_node_config(self.node_file(n)) for n, k in topology.kmstns.items()
                if k.kind == "kmstn"}


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count:
    they have exited and only wait for a parent, or init, to reap them)."""
    return _alive(pgid)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie group leader still "exists"; count only processes not yet reaped.
    try:
        with open(f"/proc/{pgid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:  # the leader is gone (or went while we read): ask the group
        return _group_has_live_members(pgid)
    if state == "Z":
        _reap()
        return _group_has_live_members(pgid)
    return True


def group_members(pgid: int) -> list[int]:
    """PIDs of the processes of group ``pgid`` that have not exited (zombies excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _group_has_live_members(pgid: int) -> bool:
    return bool(group_members(pgid))


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) if text else "(empty log)"
