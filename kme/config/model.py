"""The configuration model: frozen dataclasses for the topology and the node file.

Each field's default is written here and only here: the readers
(``kme.config.topology``, ``kme.config.node``) take a missing key's value
from the dataclass it fills (see ``kme.config.reader.Table``). The Literal
types below are the closed sets a file may choose from; their tuples are what
the readers check against.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, get_args

from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId, SaeId

__all__ = [
    "CSPRNG_MAX_KEY_COUNT",
    "CSPRNG_MAX_PER_REQUEST",
    "DEFAULT_METRICS_PORTS",
    "DELIVERY_MODES",
    "KMSTN_KINDS",
    "LOG_LEVELS",
    "MAX_SAE_ID_COUNT",
    "TPM_MODES",
    "DeliveryMode",
    "DeviceEndpoint",
    "Endpoint",
    "GatewaySettings",
    "KeyvaultSettings",
    "Kmstn",
    "KmstnKind",
    "Link",
    "LinkKindName",
    "LinkStateSettings",
    "LogLevel",
    "MetricsService",
    "MetricsSettings",
    "NodeConfig",
    "Outage",
    "QkdDeviceAccess",
    "QkdLink",
    "QkdSimSettings",
    "QuotaSettings",
    "RelaySettings",
    "StockSettings",
    "SupplySettings",
    "TlsFiles",
    "Topology",
    "TpmMode",
]

LinkKindName = Literal["qkd", "pqc", "site"]
KmstnKind = Literal["kmstn", "foreign"]
DeliveryMode = Literal["confirmed", "concurrent"]
TpmMode = Literal["auto", "device", "swtpm", "file", "stdin"]
LogLevel = Literal["debug", "info", "warning", "error"]

KMSTN_KINDS: Final[tuple[KmstnKind, ...]] = get_args(KmstnKind)
DELIVERY_MODES: Final[tuple[DeliveryMode, ...]] = get_args(DeliveryMode)
TPM_MODES: Final[tuple[TpmMode, ...]] = get_args(TpmMode)
LOG_LEVELS: Final[tuple[LogLevel, ...]] = get_args(LogLevel)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class Kmstn:
    """One node of the federation: ours ("kmstn") or a foreign KMS."""

    id: NodeId
    host: str
    etsi014_port: int
    etsi020_port: int
    relay_port: int  # 0 for a foreign KMS (it runs no kmstn relay)
    kind: KmstnKind

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
    """How the emulator (lab.qkdsim) behaves for one link; ignored by real devices."""

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

    # A topology file must give these two (see kme.config.topology); the
    # zeros only let code build a link by hand, as the routing tests do.
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
    # "confirmed": the master gets keys once every destination acknowledged
    # storing them (ETSI 020 flow). "concurrent": the paper's mode, deliver
    # at once and relay in parallel.
    delivery: DeliveryMode = "confirmed"
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
    tpm: TpmMode = "auto"
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


# Slaves per Get key beside the path slave (ETSI 014 max_SAE_ID_count).
MAX_SAE_ID_COUNT: Final = 8
# A node without QKD links serves keys from the CSPRNG with these limits.
CSPRNG_MAX_KEY_COUNT: Final = 100_000
CSPRNG_MAX_PER_REQUEST: Final = 128


@dataclass(frozen=True, slots=True)
class StockSettings:
    """A key stock toward one destination KMSTN (issue 11), filled for named SAE pairs.

    Each (master, slave) pair has its own stock: the slave's node holds each
    stocked key for exactly that slave, as it holds any relayed key.
    """

    destination: NodeId
    pairs: tuple[tuple[SaeId, SaeId], ...]
    # Most keys held per pair; a fill tops the stock up to it.
    keys: int = 64
    # Fraction of the source QKD link's measured key rate fills may use.
    share: float = 0.5
    # Keys per fill message (one relay, one QKD hop key per QKD hop).
    batch: int = 16
    # A stocked key is handed out at most this long after its fill, then
    # voided at the destination; keep it below the destination's key_ttl_s.
    ttl_s: int = 3600
    key_size: int = 256


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """A token bucket on key bits for one master SAE, or one (master, slave) pair."""

    sae: SaeId
    rate_bps: float
    burst_bits: int
    slave: SaeId | None = None


@dataclass(frozen=True, slots=True)
class SupplySettings:
    """How this node matches key supply to demand (issue 11); the defaults are today's
    behaviour: no stocks, no quotas, a Get key that finds too little key fails at once."""

    # How long a Get key waits for key when too little is at hand (0: fail
    # at once). The 014 gateway's relay_timeout_ms must exceed it.
    wait_ms: int = 0
    # Deficit round robin quantum: key bits each waiting SAE may take per round.
    quantum_bits: int = 256
    # How often the relay reads its devices' stored_key_count while requests
    # wait or stocks fill (the arrival of key wakes them).
    poll_ms: int = 50
    stocks: tuple[StockSettings, ...] = ()
    quotas: tuple[QuotaSettings, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.wait_ms or self.stocks or self.quotas)


MetricsService = Literal["routing", "keyvault", "relay", "etsi014", "etsi020"]

# Where each process of a node serves its Prometheus metrics by default: one
# port per process, on the node's own address, apart from the ETSI and relay
# ports (written here once; the node file's [metrics] table overrides them).
DEFAULT_METRICS_PORTS: Final[Mapping[str, int]] = {
    "routing": 9461, "keyvault": 9462, "relay": 9463, "etsi014": 9464, "etsi020": 9465}


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus listeners of a node's processes (kme.metrics)."""

    enabled: bool = True
    # Default: the node's own address from the topology.
    host: str = ""
    # Port per process; 0 takes an ephemeral port (tests, labs), which the
    # process logs ("metrics listening").
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    # How often the relay asks its QKD devices for their status (0: never).
    device_poll_s: float = 2.0

    def port(self, service: MetricsService) -> int:
        return self.ports[service]


@dataclass(frozen=True, slots=True)
class LinkStateSettings:
    """Signed link state: this node's key, how it is pinned, and the protocol's timers.

    Read from the node file's ``[linkstate]`` table (routing/records.py,
    routing/origin.py, relay/linkstate.py say what each does). With it, the
    node learns the federation beyond its neighbours from signed records;
    without it, routes are those of the configuration alone.
    """

    # This node's ML-DSA-65 private key (PKCS#8 PEM), its link-state
    # certificate (CN = node ID), and the federation's link-state CA that
    # pins every node's certificate.
    key: Path
    cert: Path
    ca: Path
    # Hellos to each kmstn neighbour; one with no hello answered either way
    # for dead_interval_ms is down.
    hello_interval_ms: int = 500
    dead_interval_ms: int = 2000
    # How often the relay asks its QKD devices for their status (liveness and
    # key rate); a device that stops answering takes its link down.
    device_poll_ms: int = 500
    # A fresh record at least this often, kept by others this long.
    refresh_s: float = 60.0
    lifetime_s: int = 300
    # A link that went down is announced up again after this long healthy.
    up_hold_s: float = 2.0
    # Time constant of the smoothed key rate behind a QKD link's cost.
    rate_tau_s: float = 10.0
    # A cost is announced again only when it changed by this factor, and at
    # most once per min_cost_interval_s.
    cost_hysteresis: float = 1.5
    min_cost_interval_s: float = 5.0
    # A QKD link costs at most this many times its configured cost.
    max_cost_factor: float = 100.0


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
    # What the node file says of the federation: with a per-node file, this
    # node, its neighbours, its links and its own SAEs (the rest is learned
    # from link state); with a node file that names a topology file (a lab
    # convenience), that whole file.
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
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    # Signed link state; None: routes come from the configuration alone.
    linkstate: LinkStateSettings | None = None
    supply: SupplySettings = field(default_factory=SupplySettings)

    @property
    def metrics_host(self) -> str:
        return self.metrics.host or self.node.host

    @property
    def node_id(self) -> NodeId:
        return self.node.id

    def endpoint(self, service: Literal["keyvault", "routing", "relay"]) -> Endpoint:
        return {
            "keyvault": self.keyvault_endpoint,
            "routing": self.routing_endpoint,
            "relay": self.relay_endpoint,
        }[service]
