"""The node file: which node this process is, its neighbourhood, where its data and
certificates are, and how its services are reached; and the start of every
process (:func:`load_or_exit`).

A node file comes in two forms:

* **Per node** (what ``kmstn config split`` and the lab launcher write): the
  same tables as a topology file ([federation], [[kmstn]], [[qkd_link]],
  [[pqc_link]], [[site_link]], [[sae]]), holding only this node, its
  neighbours (address, ports, kind), the links that join them, with this
  node's devices, and the SAEs this node (or a foreign KMS beside it) serves.
  Nothing about nodes further away: with a ``[linkstate]`` table, the node
  learns the rest from its neighbours' signed link-state records.
* **Naming a topology file** (``topology = "topology.toml"``), a lab
  convenience: the whole federation as configured, routes computed from it
  as configured (no link state).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from kme.config.model import (
    DEFAULT_METRICS_PORTS,
    DELIVERY_MODES,
    LOG_LEVELS,
    TPM_MODES,
    Endpoint,
    GatewaySettings,
    KeyvaultSettings,
    Kmstn,
    LinkStateSettings,
    MetricsSettings,
    NodeConfig,
    QkdDeviceAccess,
    QuotaSettings,
    RelaySettings,
    StockSettings,
    SupplySettings,
    TlsFiles,
    Topology,
)
from kme.config.reader import EX_CONFIG, ConfigError, Table, read_toml
from kme.config.topology import host_field, load_topology, read_topology
from kme.types import NodeId, SaeId

__all__ = ["load_node_config", "load_or_exit"]


class _Sourced(Protocol):
    @property
    def source(self) -> Path: ...


_C = TypeVar("_C", bound=_Sourced)


def load_or_exit(prog: str, load: Callable[[Path], _C], path: Path, check_only: bool) -> _C:
    """A process's start: its configuration, or exit 78 naming file and field.

    With ``check_only`` (``--check-config``) it says the file is valid and
    exits 0 without starting anything.
    """
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    if check_only:
        print(f"{prog}: {config.source}: configuration is valid")
        raise SystemExit(0)
    return config


def _endpoint(t: Table, key: str, default: Path) -> Endpoint:
    value = t.text(key, f"unix:{default}")
    if value.startswith("unix:"):
        p = Path(value[5:]).expanduser()
        if not p.is_absolute():
            p = (t.file.parent / p).resolve()
        if len(str(p)) > 100:
            raise t.error(key, f"unix socket path longer than 100 characters: {p}")
        return Endpoint("unix", str(p))
    if value.startswith("tcp://"):
        hostport = value[6:]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise t.error(key, f"must be unix:PATH or tcp://HOST:PORT, got {value!r}")
        return Endpoint("tcp", hostport)
    raise t.error(key, f"must be unix:PATH or tcp://HOST:PORT, got {value!r}")


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and validate a node file (and the topology file it may name)."""
    file = Path(path).resolve()
    root = Table(file, read_toml(file))

    nid = root.text("node")
    if "topology" in root.data:
        topo_path = root.path("topology", must_exist=True)
        topology = load_topology(topo_path)
        if nid not in topology.kmstns:
            raise root.error("node", f"KMSTN {nid!r} is not in the topology {topo_path}")
    else:
        topology = read_topology(file, root)
        if nid not in topology.kmstns:
            raise root.error("node", f"KMSTN {nid!r} is not among this file's [[kmstn]]")
        _check_neighbourhood(root, topology, NodeId(nid))
    node = topology.kmstns[NodeId(nid)]
    if node.kind != "kmstn":
        raise root.error("node", f"{nid!r} is a foreign KMS in the topology, not a kmstn node")
    data_dir = root.path("data_dir")

    t = root.table("tls")
    tls = TlsFiles(t.path("ca", must_exist=True), t.path("cert", must_exist=True),
                   t.path("key", must_exist=True))
    t.close()

    s = root.table("services")
    run = data_dir / "run"
    endpoints = {name: _endpoint(s, name, run / f"{name}.sock")
                 for name in ("keyvault", "routing", "relay")}
    s.close()

    lg = root.table("log")
    level = lg.choice("level", LOG_LEVELS, "info")
    lg.close()

    gateway = _read_gateway(root.table("gateway", GatewaySettings))
    keyvault = _read_keyvault(root.table("keyvault", KeyvaultSettings))
    relay = _read_relay(root.table("relay", RelaySettings))
    metrics = _read_metrics(root.table("metrics", MetricsSettings), node)
    linkstate = None
    if "linkstate" in root.data:
        if "topology" in root.data:
            raise root.error("linkstate", "link state needs a per-node file; this one names "
                                          "a topology file (routes as configured)")
        linkstate = _read_linkstate(root.table("linkstate", LinkStateSettings,
                                               required=("key", "cert", "ca")))
    # A per-node file knows only the neighbourhood: SAEs and nodes further away
    # are checked when a key is asked for, not here.
    supply = _read_supply(root.table("supply", SupplySettings), topology, node, gateway,
                          complete="topology" in root.data)

    my_links = {link.id: link for link in topology.links_of(node.id) if link.kind == "qkd"}
    devices: dict[str, QkdDeviceAccess] = {}
    for d in root.tables("qkd_device", QkdDeviceAccess):
        lid = d.text("link")
        if lid not in my_links:
            raise d.error("link", f"{lid!r} is not a QKD link of {nid}")
        if lid in devices:
            raise d.error("link", f"duplicate device entry for link {lid!r}")
        devices[lid] = QkdDeviceAccess(
            link=lid,
            tls=TlsFiles(d.path("ca", tls.ca, must_exist=True),
                         d.path("cert", tls.cert, must_exist=True),
                         d.path("key", tls.key, must_exist=True)),
            timeout_ms=d.integer("timeout_ms", lo=10, hi=120_000),
        )
        d.close()
    # A QKD link with no explicit entry reaches its device with the node's own
    # certificate: the common case in labs and in the demo.
    for lid in my_links:
        devices.setdefault(lid, QkdDeviceAccess(link=lid, tls=tls))
    root.close()

    return NodeConfig(
        source=file, node=node, topology=topology, data_dir=data_dir, tls=tls,
        keyvault_endpoint=endpoints["keyvault"], routing_endpoint=endpoints["routing"],
        relay_endpoint=endpoints["relay"], log_level=level, gateway=gateway,
        keyvault=keyvault, relay=relay, qkd_devices=devices, metrics=metrics,
        linkstate=linkstate, supply=supply,
    )


def _check_neighbourhood(root: Table, topology: Topology, me: NodeId) -> None:
    """A per-node file names only this node's neighbourhood (each problem names its field)."""
    linked = {link.other(me) for link in topology.links_of(me)}
    for i, k in enumerate(topology.kmstns.values()):
        if k.id != me and k.id not in linked:
            raise root.error(f"kmstn[{i}].id", f"{k.id} is not a neighbour of {me} (no link "
                                               "joins them): a node file names only neighbours")
    index: dict[str, int] = {}
    for link in topology.links:
        table = f"{link.kind}_link"
        i = index[table] = index.get(table, -1) + 1
        if me not in (link.a, link.b):
            raise root.error(f"{table}[{i}].a", f"link {link.id} does not end at {me}: a node "
                                                "file holds only this node's links")
    foreign = {n for n in linked if topology.kmstns[n].kind == "foreign"}
    for i, (sae, at) in enumerate(topology.saes.items()):
        if at != me and at not in foreign:
            raise root.error(f"sae[{i}].kmstn", f"{sae} is served by {at}: a node file names "
                                                "only the SAEs of this node (and of a foreign "
                                                "KMS beside it)")


def _read_gateway(g: Table) -> GatewaySettings:
    gateway = GatewaySettings(
        delivery=g.choice("delivery", DELIVERY_MODES),
        inflight_wait_ms=g.integer("inflight_wait_ms", lo=0, hi=60_000),
        relay_timeout_ms=g.integer("relay_timeout_ms", lo=100, hi=600_000),
        workers=g.integer("workers", lo=1, hi=64),
        threads=g.integer("threads", lo=1, hi=1024),
        handshake_timeout_ms=g.integer("handshake_timeout_ms", lo=100, hi=60_000),
        header_timeout_ms=g.integer("header_timeout_ms", lo=100, hi=60_000),
        body_timeout_ms=g.integer("body_timeout_ms", lo=100, hi=60_000),
        keepalive_timeout_ms=g.integer("keepalive_timeout_ms", lo=100, hi=600_000),
        max_handshakes=g.integer("max_handshakes", lo=1, hi=100_000),
        max_handshakes_per_source=g.integer("max_handshakes_per_source", lo=1, hi=100_000),
        max_idle=g.integer("max_idle", lo=1, hi=100_000),
        max_idle_per_source=g.integer("max_idle_per_source", lo=1, hi=100_000),
    )
    g.close()
    return gateway


def _read_keyvault(k: Table) -> KeyvaultSettings:
    tpm = k.choice("tpm", TPM_MODES)
    key_file = k.optional_path("key_file", must_exist=tpm == "file")
    if tpm == "file" and key_file is None:
        raise k.error("key_file", 'is required when tpm = "file"')
    keyvault = KeyvaultSettings(
        tpm=tpm,
        # A device node, taken as written (not relative to the file).
        tpm_device=k.path("tpm_device", resolve=False),
        key_file=key_file,
        key_ttl_s=k.integer("key_ttl_s", lo=1),
        tombstone_ttl_s=k.integer("tombstone_ttl_s", lo=1),
        tpm_auth_file=k.optional_path("tpm_auth_file", must_exist=True),
    )
    k.close()
    return keyvault


def _read_relay(r: Table) -> RelaySettings:
    relay = RelaySettings(
        kem_pool_size=r.integer("kem_pool_size", lo=1, hi=4096),
        session_ttl_s=r.integer("session_ttl_s", lo=1, hi=86_400),
        timeout_ms=r.integer("timeout_ms", lo=100, hi=600_000),
        qkd_reserve=r.integer("qkd_reserve", lo=0, hi=128),
    )
    r.close()
    return relay


def _read_linkstate(t: Table) -> LinkStateSettings:
    hello = t.integer("hello_interval_ms", lo=50, hi=60_000)
    dead = t.integer("dead_interval_ms", lo=100, hi=600_000)
    if dead < 2 * hello:
        raise t.error("dead_interval_ms", f"must be at least twice hello_interval_ms ({hello})")
    refresh = t.number("refresh_s")
    lifetime = t.integer("lifetime_s", lo=10, hi=86_400)
    if lifetime < 2 * refresh:
        raise t.error("lifetime_s", f"must be at least twice refresh_s ({refresh:g})")
    settings = LinkStateSettings(
        key=t.path("key", must_exist=True), cert=t.path("cert", must_exist=True),
        ca=t.path("ca", must_exist=True),
        hello_interval_ms=hello, dead_interval_ms=dead,
        device_poll_ms=t.integer("device_poll_ms", lo=50, hi=600_000),
        refresh_s=refresh, lifetime_s=lifetime,
        up_hold_s=t.number("up_hold_s", nonnegative=True),
        rate_tau_s=t.number("rate_tau_s"),
        cost_hysteresis=t.number("cost_hysteresis"),
        min_cost_interval_s=t.number("min_cost_interval_s", nonnegative=True),
        max_cost_factor=t.number("max_cost_factor"),
    )
    if settings.cost_hysteresis < 1:
        raise t.error("cost_hysteresis", "must be at least 1 (a factor)")
    t.close()
    return settings


def _read_metrics(m: Table, node: Kmstn) -> MetricsSettings:
    enabled = m.boolean("enabled")
    host = host_field(m, "host") if "host" in m.data else m.text("host", "")
    ports: dict[str, int] = {}
    taken = {node.etsi014_port: "etsi014_port", node.etsi020_port: "etsi020_port",
             node.relay_port: "relay_port"}
    for service, default in DEFAULT_METRICS_PORTS.items():
        key = f"{service}_port"
        port = m.integer(key, default, lo=0, hi=65535)
        if port and (not host or host == node.host) and port in taken:
            raise m.error(key, f"{port} is this node's {taken[port]} in the topology; "
                               "metrics need a port of their own")
        if port and port in ports.values():
            other = next(s for s, p in ports.items() if p == port)
            raise m.error(key, f"{port} is already metrics.{other}_port")
        ports[service] = port
    poll = m.number("device_poll_s", nonnegative=True)
    m.close()
    return MetricsSettings(enabled=enabled, host=host, ports=ports, device_poll_s=poll)


def _pair(t: Table, key: str, text: str, topology: Topology, node: Kmstn,
          complete: bool) -> tuple[SaeId, SaeId]:
    master, sep, slave = text.partition(":")
    if not sep or not master or not slave:
        raise t.error(key, f"must be \"MASTER:SLAVE\", got {text!r}")
    for sae in (master, slave) if complete else ():
        if sae not in topology.saes:
            raise t.error(key, f"SAE {sae!r} is not in the topology")
    if topology.saes.get(SaeId(master)) != node.id:
        raise t.error(key, f"master SAE {master!r} is not served by {node.id}")
    return SaeId(master), SaeId(slave)


def _read_supply(t: Table, topology: Topology, node: Kmstn,
                 gateway: GatewaySettings, *, complete: bool = True) -> SupplySettings:
    """``complete``: the topology names every node and SAE (a topology file); a per-node
    file names only neighbours, so a stock's far destination and slave are taken as
    written (a wrong one fails its fills, visibly, and serves nobody)."""
    wait_ms = t.integer("wait_ms", lo=0, hi=300_000)
    if wait_ms and wait_ms + 1000 > gateway.relay_timeout_ms:
        # The gateway's deadline for the relay call must cover the wait and
        # the delivery after it.
        raise t.error("wait_ms", f"{wait_ms} leaves no time within gateway.relay_timeout_ms "
                                 f"= {gateway.relay_timeout_ms}; raise that to at least "
                                 f"{wait_ms + 1000}")
    stocks: list[StockSettings] = []
    for st in t.tables("stocks", StockSettings):
        dest = st.text("destination")
        if dest == node.id or (complete and dest not in topology.kmstns):
            raise st.error("destination", f"{dest!r} is not another KMSTN of the topology")
        pairs = tuple(_pair(st, "pairs", p, topology, node, complete)
                      for p in st.strings("pairs"))
        for _, slave in pairs:
            if complete and topology.saes[slave] != dest:
                raise st.error("pairs", f"slave SAE {slave!r} is not served by {dest}")
        ttl = st.integer("ttl_s", lo=1)
        stocks.append(StockSettings(
            destination=NodeId(dest), pairs=pairs, keys=st.integer("keys", lo=1, hi=100_000),
            share=st.number("share"), batch=st.integer("batch", lo=1, hi=128), ttl_s=ttl,
            key_size=st.integer("key_size", lo=8, hi=65_536)))
        if stocks[-1].share > 1:
            raise st.error("share", f"must be at most 1, got {stocks[-1].share}")
        st.close()
    quotas: list[QuotaSettings] = []
    for q in t.tables("quotas", QuotaSettings):
        sae = q.text("sae")
        if topology.saes.get(SaeId(sae)) != node.id:
            raise q.error("sae", f"SAE {sae!r} is not served by {node.id}")
        peer = str(q.text("slave", ""))
        if peer and complete and peer not in topology.saes:
            raise q.error("slave", f"SAE {peer!r} is not in the topology")
        quotas.append(QuotaSettings(SaeId(sae), q.number("rate_bps"),
                                    q.integer("burst_bits", lo=1),
                                    SaeId(peer) if peer else None))
        q.close()
    supply = SupplySettings(wait_ms=wait_ms, quantum_bits=t.integer("quantum_bits", lo=1),
                            poll_ms=t.integer("poll_ms", lo=5, hi=60_000),
                            stocks=tuple(stocks), quotas=tuple(quotas))
    t.close()
    return supply
