"""Topology and node configuration: TOML files, validated at start.

Two files configure a node. The **topology** file describes the whole
federation and is the same on every node: KMSTNs (and foreign KMSs) with
their addresses, QKD links with their secret key rate and device endpoints,
PQC links, site links to foreign KMSs, and SAEs with the node that serves
them. The **node** file says which node this process belongs to, where its
data and certificates are, and how its services are reached.

Every problem raises :class:`ConfigError`, whose text names the file and the
exact field (``kmstn[2].etsi014_port``); unknown keys are errors, so a typo
never silently falls back to a default. Processes turn a ConfigError into
exit code 78 (EX_CONFIG). Secrets are only ever referenced as file paths.
"""

from __future__ import annotations

import ipaddress
import math
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar

from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId, node_id, sae_id

__all__ = [
    "EX_CONFIG",
    "ConfigError",
    "DeviceEndpoint",
    "Endpoint",
    "GatewaySettings",
    "KeyvaultSettings",
    "Kmstn",
    "Link",
    "NodeConfig",
    "Outage",
    "QkdDeviceAccess",
    "QkdLink",
    "QkdSimSettings",
    "RelaySettings",
    "TlsFiles",
    "Topology",
    "load_node_config",
    "load_or_exit",
    "load_topology",
]

EX_CONFIG: Final = 78  # sysexits.h: configuration error

LinkKindName = Literal["qkd", "pqc", "site"]


class ConfigError(KmstnError):
    """A configuration file is unreadable or invalid; names file and field."""

    def __init__(self, file: Path | str, fieldname: str, problem: str) -> None:
        self.file = str(file)
        self.field = fieldname
        self.problem = problem
        text = f"{self.file}: {fieldname}: {problem}" if fieldname else f"{self.file}: {problem}"
        super().__init__(ErrorCode.INVALID_ARGUMENT, text)

    def __str__(self) -> str:
        return self.public


# --------------------------------------------------------------------------
# Domain objects
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kmstn:
    """One node of the federation: ours ("kmstn") or a foreign KMS."""

    id: NodeId
    host: str
    etsi014_port: int
    etsi020_port: int
    relay_port: int  # 0 for a foreign KMS (it runs no kmstn relay)
    kind: Literal["kmstn", "foreign"]

    @property
    def etsi014_url(self) -> str:
        return f"https://{_url_host(self.host)}:{self.etsi014_port}"

    @property
    def etsi020_url(self) -> str:
        return f"https://{_url_host(self.host)}:{self.etsi020_port}"


@dataclass(frozen=True, slots=True)
class DeviceEndpoint:
    """The vendor KME of a QKD device beside one end of a QKD link."""

    host: str
    port: int
    kme_id: str
    # The identity the KMSTN presents to this device (the SAE ID in its
    # client certificate, as far as the device is concerned).
    sae_id: SaeId

    @property
    def url(self) -> str:
        return f"https://{_url_host(self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class Outage:
    """A window, in seconds from emulator start, during which a device answers 503."""

    start_s: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class QkdSimSettings:
    """How the emulator (kme.qkdsim) behaves for one link; ignored by real devices."""

    rate_multiplier: float = 1.0
    seed: int | None = None
    outages: tuple[Outage, ...] = ()
    # Keys issued at one end and not fetched at the other are forgotten after this.
    issued_ttl_s: float = 600.0
    # Shape k of the gamma-distributed time between key blocks: 1 gives
    # exponential gaps (Poisson arrivals); larger k gives more regular blocks.
    arrival_shape: float = 1.0
    # Keys of key_size already in the store when the emulator starts.
    initial_keys: int = 0


@dataclass(frozen=True, slots=True)
class Link:
    """An edge of the federation graph."""

    id: str
    kind: LinkKindName
    a: NodeId
    b: NodeId
    cost: float

    def other(self, node: NodeId) -> NodeId:
        if node == self.a:
            return self.b
        if node == self.b:
            return self.a
        raise ValueError(f"{node} is not an end of link {self.id}")


@dataclass(frozen=True, slots=True)
class QkdLink(Link):
    """A QKD link: two devices (Alice beside ``a``, Bob beside ``b``) sharing keys."""

    secret_key_rate: float = 0.0  # bits per second
    block_size: int = 0  # bits per block of key material
    key_size: int = 256  # default key size in bits (ETSI 014 Status key_size)
    min_key_size: int = 64
    max_key_size: int = 1024
    max_key_count: int = 100_000
    max_key_per_request: int = 128
    alice: DeviceEndpoint | None = None
    bob: DeviceEndpoint | None = None
    sim: QkdSimSettings = field(default_factory=QkdSimSettings)

    def device_of(self, node: NodeId) -> DeviceEndpoint:
        """The device beside ``node`` (Alice for ``a``, Bob for ``b``)."""
        end = self.alice if node == self.a else self.bob if node == self.b else None
        if end is None:
            raise ValueError(f"{node} is not an end of link {self.id}")
        return end

    def peer_device_of(self, node: NodeId) -> DeviceEndpoint:
        return self.device_of(self.other(node))


@dataclass(frozen=True, slots=True)
class Topology:
    """The federation as configured; immutable once loaded."""

    source: Path
    name: str
    key_size: int
    kmstns: Mapping[NodeId, Kmstn]
    links: tuple[Link, ...]
    saes: Mapping[SaeId, NodeId]

    @property
    def qkd_links(self) -> tuple[QkdLink, ...]:
        return tuple(link for link in self.links if isinstance(link, QkdLink))

    def link(self, link_id: str) -> Link:
        for link in self.links:
            if link.id == link_id:
                return link
        raise KmstnError(ErrorCode.UNKNOWN_NODE, f"unknown link {link_id!r}")

    def links_of(self, node: NodeId) -> Iterator[Link]:
        return (link for link in self.links if node in (link.a, link.b))

    def node_of_sae(self, sae: str) -> NodeId:
        try:
            return self.saes[SaeId(sae)]
        except KeyError:
            raise KmstnError(ErrorCode.UNKNOWN_SAE, f"unknown SAE {sae!r}") from None

    def saes_of(self, node: NodeId) -> tuple[SaeId, ...]:
        return tuple(s for s, n in self.saes.items() if n == node)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an internal gRPC service listens: a unix socket or TCP with mTLS."""

    scheme: Literal["unix", "tcp"]
    address: str  # socket path, or host:port

    @property
    def grpc_target(self) -> str:
        return f"unix:{self.address}" if self.scheme == "unix" else self.address

    def __str__(self) -> str:
        return f"{self.scheme}:{self.address}" if self.scheme == "unix" else f"tcp://{self.address}"


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """The ``[gateway]`` table; these field defaults are the only place defaults live."""

    # "confirmed": the master gets keys once every destination acknowledged
    # storing them (ETSI 020 flow). "concurrent": the paper's mode, deliver
    # at once and relay in parallel.
    delivery: Literal["confirmed", "concurrent"] = "confirmed"
    # In concurrent mode, how long dec_keys waits for a key still in flight.
    inflight_wait_ms: int = 2000
    relay_timeout_ms: int = 10_000
    workers: int = 1
    threads: int = 32
    # The edge of both ETSI listeners (gateway/edge.py). A client must finish
    # its TLS handshake, the head of a request (from its first byte) and the
    # body (from the end of the head) within these deadlines, or it is
    # dropped; no request worker waits on it meanwhile.
    handshake_timeout_ms: int = 5000
    header_timeout_ms: int = 5000
    body_timeout_ms: int = 5000
    # How long a connection may wait, between requests, for the next one.
    keepalive_timeout_ms: int = 15_000
    # Connections still in their TLS handshake, and connections waiting for
    # or sending a request (not yet with a worker), in total and per source
    # address. Over the per-source handshake cap a new connection is refused;
    # over the other caps the oldest such connection is dropped to make room.
    # Per source, 64 handshakes leave room for a neighbour's relay (32 calls
    # at once), 128 kept-alive connections for the paper's burst of 100
    # simultaneous SAE requests (kmstn bench concurrency).
    max_handshakes: int = 256
    max_handshakes_per_source: int = 64
    max_idle: int = 1024
    max_idle_per_source: int = 128


@dataclass(frozen=True, slots=True)
class KeyvaultSettings:
    # How the database key is protected: "auto" tries the hardware TPM
    # (tpm_device), then swtpm, then refuses; "file" and "stdin" read it.
    tpm: Literal["auto", "device", "swtpm", "file", "stdin"] = "auto"
    tpm_device: Path = Path("/dev/tpmrm0")
    key_file: Path | None = None
    key_ttl_s: int = 86_400
    tombstone_ttl_s: int = 30 * 86_400
    # Optional secret (a file) that authorises the TPM to unseal the database
    # key; with none, the sealed object has an empty auth value.
    tpm_auth_file: Path | None = None


@dataclass(frozen=True, slots=True)
class RelaySettings:
    kem_pool_size: int = 64
    session_ttl_s: int = 300
    timeout_ms: int = 10_000
    # QKD hop keys taken ahead and announced to each QKD neighbour (0: take
    # them per message). Each is 256 bits of the link's key.
    qkd_reserve: int = 8


@dataclass(frozen=True, slots=True)
class QkdDeviceAccess:
    """Credentials this node uses toward its device on one QKD link."""

    link: str
    tls: TlsFiles
    timeout_ms: int = 2000


@dataclass(frozen=True, slots=True)
class NodeConfig:
    source: Path
    node: Kmstn
    topology: Topology
    data_dir: Path
    tls: TlsFiles
    keyvault_endpoint: Endpoint
    routing_endpoint: Endpoint
    relay_endpoint: Endpoint
    log_level: str
    gateway: GatewaySettings
    keyvault: KeyvaultSettings
    relay: RelaySettings
    qkd_devices: Mapping[str, QkdDeviceAccess]

    @property
    def node_id(self) -> NodeId:
        return self.node.id

    def endpoint(self, service: Literal["keyvault", "routing", "relay"]) -> Endpoint:
        return {
            "keyvault": self.keyvault_endpoint,
            "routing": self.routing_endpoint,
            "relay": self.relay_endpoint,
        }[service]


# --------------------------------------------------------------------------
# A strict reader for TOML tables
# --------------------------------------------------------------------------

_REQUIRED: Final = object()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _type_name(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


class _Table:
    """Read fields from one TOML table, remembering which were used."""

    def __init__(self, file: Path, data: Mapping[str, Any], where: str = "") -> None:
        self.file = file
        self.data = data
        self.where = where
        self._seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.name(key), problem)

    def has(self, key: str) -> bool:
        return key in self.data

    def _raw(self, key: str, default: object) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def text(self, key: str, default: object = _REQUIRED, *, choices: tuple[str, ...] = ()) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {_type_name(value)}")
        if choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def integer(self, key: str, default: object = _REQUIRED, *, lo: int | None = None,
            hi: int | None = None) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {_type_name(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise self.error(key, f"must be an integer {bounds}, got {value}")
        return value

    def number(self, key: str, default: object = _REQUIRED, *, positive: bool = True,
               nonnegative: bool = False) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, got {value}")
        if nonnegative and value < 0:
            raise self.error(key, f"must be zero or more, got {value}")
        if positive and not nonnegative and value <= 0:
            raise self.error(key, f"must be greater than 0, got {value}")
        return float(value)

    def path(self, key: str, default: object = _REQUIRED, *, must_exist: bool = False) -> Any:
        value = self.text(key, default)
        if value is default and default is not _REQUIRED:
            return value
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (self.file.parent / path).resolve()
        if must_exist and not path.is_file():
            raise self.error(key, f"file not found: {path}")
        return path

    def table(self, key: str) -> _Table:
        value = self._raw(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, got {_type_name(value)}")
        return _Table(self.file, value, self.name(key))

    def tables(self, key: str) -> list[_Table]:
        value = self._raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, "must be an array of tables ([[" + self.name(key) + "]])")
        return [_Table(self.file, v, f"{self.name(key)}[{i}]") for i, v in enumerate(value)]

    def close(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None


def _host(t: _Table, key: str, default: object = _REQUIRED) -> Any:
    value = t.text(key, default)
    if value is default and default is not _REQUIRED:
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        labels = value.rstrip(".").split(".")
        if not all(lab and len(lab) <= 63 and lab.replace("-", "").isalnum() for lab in labels):
            raise t.error(key, f"must be an IP address or host name, got {value!r}") from None
    return value


def _ident(t: _Table, key: str, kind: str) -> Any:
    value = t.text(key)
    try:
        return sae_id(value) if kind == "SAE" else node_id(value)
    except KmstnError as exc:
        raise t.error(key, exc.public) from None


_PORT = {"lo": 1, "hi": 65535}


# --------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; raises ConfigError naming the field."""
    file = Path(path).resolve()
    root = _Table(file, _read_toml(file))

    fed = root.table("federation")
    name = fed.text("name")
    key_size = fed.integer("key_size", 256, lo=8, hi=65536)
    fed.close()

    kmstns: dict[NodeId, Kmstn] = {}
    for t in root.tables("kmstn"):
        nid = _ident(t, "id", "node")
        if nid in kmstns:
            raise t.error("id", f"duplicate KMSTN id {nid!r}")
        kind = t.text("kind", "kmstn", choices=("kmstn", "foreign"))
        host = _host(t, "host")
        k = Kmstn(
            id=nid,
            host=host,
            etsi014_port=t.integer("etsi014_port", **_PORT) if kind == "kmstn" else
            t.integer("etsi014_port", 0, lo=0, hi=65535),
            etsi020_port=t.integer("etsi020_port", **_PORT),
            relay_port=t.integer("relay_port", **_PORT) if kind == "kmstn" else 0,
            kind=kind,
        )
        t.close()
        kmstns[nid] = k
    if not kmstns:
        raise ConfigError(file, "kmstn", "at least one [[kmstn]] is required")

    links: list[Link] = []
    link_ids: set[str] = set()
    pairs: set[tuple[str, frozenset[str]]] = set()

    def link_common(t: _Table, kind: LinkKindName) -> tuple[str, NodeId, NodeId, float]:
        lid = t.text("id")
        if lid in link_ids:
            raise t.error("id", f"duplicate link id {lid!r}")
        link_ids.add(lid)
        ends = []
        for end in ("a", "b"):
            n = t.text(end)
            if n not in kmstns:
                raise t.error(end, f"unknown KMSTN {n!r}")
            ends.append(NodeId(n))
        if ends[0] == ends[1]:
            raise t.error("b", "a link must join two different KMSTNs")
        pair = (kind, frozenset(ends))
        if pair in pairs:
            raise t.error("id", f"a {kind} link between {ends[0]} and {ends[1]} already exists")
        pairs.add(pair)
        foreign = [kmstns[e].kind == "foreign" for e in ends]
        if kind == "site" and not any(foreign):
            raise t.error("a", "a site link joins a KMSTN to a foreign KMS; neither end is foreign")
        if kind == "site" and all(foreign):
            raise t.error("b", "a site link needs one kmstn end; both ends are foreign")
        if kind != "site" and any(foreign):
            bad = "a" if foreign[0] else "b"
            raise t.error(bad, f"a {kind} link cannot end at a foreign KMS; use [[site_link]]")
        cost = t.number("cost", 1.0)
        return lid, ends[0], ends[1], cost

    for t in root.tables("qkd_link"):
        lid, a, b, cost = link_common(t, "qkd")
        ksize = t.integer("key_size", key_size, lo=1, hi=65536)
        min_size = t.integer("min_key_size", min(64, ksize), lo=1, hi=65536)
        max_size = t.integer("max_key_size", max(1024, ksize), lo=1, hi=65536)
        if not min_size <= ksize <= max_size:
            raise t.error("key_size", f"must lie between min_key_size {min_size} and "
                                      f"max_key_size {max_size}, got {ksize}")
        devices = []
        for end, node, suffix in (("alice", a, "alice"), ("bob", b, "bob")):
            d = t.table(end)
            if not d.data:
                raise t.error(end, "is required (the device KME beside this end)")
            dev_sae = d.text("sae_id", str(node))
            try:
                sae_id(dev_sae)
            except KmstnError as exc:
                raise d.error("sae_id", exc.public) from None
            devices.append(DeviceEndpoint(
                host=_host(d, "host"),
                port=d.integer("port", **_PORT),
                kme_id=d.text("kme_id", f"{lid}-{suffix}"),
                sae_id=SaeId(dev_sae),
            ))
            d.close()
        if devices[0].sae_id == devices[1].sae_id:
            raise t.error("bob.sae_id", "must differ from alice.sae_id")
        s = t.table("sim")
        outages = []
        for o in s.tables("outage"):
            outages.append(Outage(o.number("start_s", nonnegative=True),
                                  o.number("duration_s")))
            o.close()
        seed = s.integer("seed", None, lo=0)
        sim = QkdSimSettings(
            rate_multiplier=s.number("rate_multiplier", 1.0, nonnegative=True),
            seed=seed,
            outages=tuple(outages),
            issued_ttl_s=s.number("issued_ttl_s", 600.0),
            arrival_shape=s.number("arrival_shape", 1.0),
            initial_keys=s.integer("initial_keys", 0, lo=0),
        )
        s.close()
        links.append(QkdLink(
            id=lid, kind="qkd", a=a, b=b, cost=cost,
            secret_key_rate=t.number("secret_key_rate"),
            block_size=t.integer("block_size", lo=8, hi=1 << 30),
            key_size=ksize,
            min_key_size=min_size,
            max_key_size=max_size,
            max_key_count=t.integer("max_key_count", 100_000, lo=1),
            max_key_per_request=t.integer("max_key_per_request", 128, lo=1, hi=100_000),
            alice=devices[0],
            bob=devices[1],
            sim=sim,
        ))
        t.close()

    for kind in ("pqc", "site"):
        for t in root.tables(f"{kind}_link"):
            lid, a, b, cost = link_common(t, kind)  # type: ignore[arg-type]
            links.append(Link(id=lid, kind=kind, a=a, b=b, cost=cost))  # type: ignore[arg-type]
            t.close()

    saes: dict[SaeId, NodeId] = {}
    for t in root.tables("sae"):
        sid = _ident(t, "id", "SAE")
        if sid in saes:
            raise t.error("id", f"duplicate SAE id {sid!r}")
        node = t.text("kmstn")
        if node not in kmstns:
            raise t.error("kmstn", f"unknown KMSTN {node!r}")
        saes[sid] = NodeId(node)
        t.close()
    root.close()

    _check_addresses(file, kmstns, links)
    return Topology(source=file, name=name, key_size=key_size, kmstns=kmstns,
                    links=tuple(links), saes=saes)


def _check_addresses(file: Path, kmstns: Mapping[NodeId, Kmstn], links: list[Link]) -> None:
    """Two listeners on one host:port would fail at start; say so now."""
    used: dict[tuple[str, int], str] = {}

    def claim(host: str, port: int, what: str) -> None:
        if port == 0:
            return
        other = used.setdefault((host, port), what)
        if other != what:
            raise ConfigError(file, what, f"{host}:{port} is already used by {other}")

    for i, k in enumerate(kmstns.values()):
        claim(k.host, k.etsi014_port, f"kmstn[{i}].etsi014_port")
        claim(k.host, k.etsi020_port, f"kmstn[{i}].etsi020_port")
        claim(k.host, k.relay_port, f"kmstn[{i}].relay_port")
    qi = 0
    for link in links:
        if isinstance(link, QkdLink) and link.alice and link.bob:
            claim(link.alice.host, link.alice.port, f"qkd_link[{qi}].alice.port")
            claim(link.bob.host, link.bob.port, f"qkd_link[{qi}].bob.port")
            qi += 1


# --------------------------------------------------------------------------
# Node file
# --------------------------------------------------------------------------


def _endpoint(t: _Table, key: str, default: Path) -> Endpoint:
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


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and validate a node file and the topology it names."""
    file = Path(path).resolve()
    root = _Table(file, _read_toml(file))

    topo_path = root.path("topology", must_exist=True)
    topology = load_topology(topo_path)
    nid = root.text("node")
    if nid not in topology.kmstns:
        raise root.error("node", f"KMSTN {nid!r} is not in the topology {topo_path}")
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
    level = lg.text("level", "info", choices=("debug", "info", "warning", "error"))
    lg.close()

    g = root.table("gateway")
    gw = GatewaySettings()  # the defaults
    gateway = GatewaySettings(
        delivery=g.text("delivery", gw.delivery, choices=("confirmed", "concurrent")),
        inflight_wait_ms=g.integer("inflight_wait_ms", gw.inflight_wait_ms, lo=0, hi=60_000),
        relay_timeout_ms=g.integer("relay_timeout_ms", gw.relay_timeout_ms, lo=100,
                                   hi=600_000),
        workers=g.integer("workers", gw.workers, lo=1, hi=64),
        threads=g.integer("threads", gw.threads, lo=1, hi=1024),
        handshake_timeout_ms=g.integer("handshake_timeout_ms", gw.handshake_timeout_ms,
                                       lo=100, hi=60_000),
        header_timeout_ms=g.integer("header_timeout_ms", gw.header_timeout_ms, lo=100,
                                    hi=60_000),
        body_timeout_ms=g.integer("body_timeout_ms", gw.body_timeout_ms, lo=100, hi=60_000),
        keepalive_timeout_ms=g.integer("keepalive_timeout_ms", gw.keepalive_timeout_ms,
                                       lo=100, hi=600_000),
        max_handshakes=g.integer("max_handshakes", gw.max_handshakes, lo=1, hi=100_000),
        max_handshakes_per_source=g.integer("max_handshakes_per_source",
                                            gw.max_handshakes_per_source, lo=1, hi=100_000),
        max_idle=g.integer("max_idle", gw.max_idle, lo=1, hi=100_000),
        max_idle_per_source=g.integer("max_idle_per_source", gw.max_idle_per_source, lo=1,
                                      hi=100_000),
    )
    g.close()

    k = root.table("keyvault")
    tpm = k.text("tpm", "auto", choices=("auto", "device", "swtpm", "file", "stdin"))
    key_file = k.path("key_file", None, must_exist=tpm == "file")
    if tpm == "file" and key_file is None:
        raise k.error("key_file", 'is required when tpm = "file"')
    keyvault = KeyvaultSettings(
        tpm=tpm,
        tpm_device=Path(k.text("tpm_device", "/dev/tpmrm0")),
        key_file=key_file,
        key_ttl_s=k.integer("key_ttl_s", 86_400, lo=1),
        tombstone_ttl_s=k.integer("tombstone_ttl_s", 30 * 86_400, lo=1),
        tpm_auth_file=k.path("tpm_auth_file", None, must_exist=True),
    )
    k.close()

    r = root.table("relay")
    relay = RelaySettings(
        kem_pool_size=r.integer("kem_pool_size", 64, lo=1, hi=4096),
        session_ttl_s=r.integer("session_ttl_s", 300, lo=1, hi=86_400),
        timeout_ms=r.integer("timeout_ms", 10_000, lo=100, hi=600_000),
        qkd_reserve=r.integer("qkd_reserve", 8, lo=0, hi=128),
    )
    r.close()

    my_links = {link.id: link for link in topology.links_of(node.id) if link.kind == "qkd"}
    devices: dict[str, QkdDeviceAccess] = {}
    for d in root.tables("qkd_device"):
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
            timeout_ms=d.integer("timeout_ms", 2000, lo=10, hi=120_000),
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
        keyvault=keyvault, relay=relay, qkd_devices=devices,
    )
