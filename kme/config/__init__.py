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

The package's parts: ``model`` (the frozen dataclasses, where every default
is written), ``reader`` (the strict, typed TOML table reader and
ConfigError), ``topology`` (:func:`load_topology`) and ``node``
(:func:`load_node_config`, :func:`load_or_exit`). Import from here.
"""

from kme.config.model import (
    CSPRNG_MAX_KEY_COUNT,
    CSPRNG_MAX_PER_REQUEST,
    DEFAULT_METRICS_PORTS,
    DELIVERY_MODES,
    KMSTN_KINDS,
    LOG_LEVELS,
    MAX_SAE_ID_COUNT,
    TPM_MODES,
    DeliveryMode,
    DeviceEndpoint,
    Endpoint,
    GatewaySettings,
    KeyvaultSettings,
    Kmstn,
    KmstnKind,
    Link,
    LinkKindName,
    LinkStateSettings,
    LogLevel,
    MetricsService,
    MetricsSettings,
    NodeConfig,
    Outage,
    QkdDeviceAccess,
    QkdLink,
    QkdSimSettings,
    QuotaSettings,
    RelaySettings,
    StockSettings,
    SupplySettings,
    TlsFiles,
    Topology,
    TpmMode,
)
from kme.config.node import load_node_config, load_or_exit
from kme.config.reader import EX_CONFIG, ConfigError
from kme.config.topology import load_topology

__all__ = [
    "CSPRNG_MAX_KEY_COUNT",
    "CSPRNG_MAX_PER_REQUEST",
    "DEFAULT_METRICS_PORTS",
    "DELIVERY_MODES",
    "EX_CONFIG",
    "KMSTN_KINDS",
    "LOG_LEVELS",
    "MAX_SAE_ID_COUNT",
    "TPM_MODES",
    "ConfigError",
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
    "load_node_config",
    "load_or_exit",
    "load_topology",
]
