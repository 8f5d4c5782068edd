"""Prometheus metrics of one kmstn process, and the listener that exposes them.

Every process (routing, keyvault, relay, each gateway) has its own registry,
:data:`REGISTRY`, and serves it in the Prometheus text exposition format on
its own plain HTTP listener (``GET /metrics``), bound to the node's address
and a port of the node file's ``[metrics]`` table, never an ETSI port (see
``kme.config.DEFAULT_METRICS_PORTS``). Port 0 takes an ephemeral port; the
port a process got is logged (``"metrics listening"``, field
``metrics_url``), which is how the lab launcher finds it.

Every family the node exposes is defined here, by Prometheus conventions:
a ``kmstn_`` prefix, the unit in the name (``_seconds``, ``_bits``),
``_total`` on counters. Labels carry bounded, public values only: API and
operation names, status codes, link IDs and kinds, node and SAE IDs. Never a
key ID, key bytes, a KEM secret or anything an SAE keeps secret: the helpers
take only those values, and a canary test scrapes every service after a key
exchange and looks for the keys' IDs and bytes.

Who calls what (one helper per event; all are cheap, see the measurement in
the benchmark ``python -m kme.metricsserver``):

==========================  =================================================
helper                      called by
==========================  =================================================
observe_http_request        gateway.app, after each request (both listeners)
GrpcServerMetrics           kme.server, an interceptor on every gRPC server
observe_hop                 the relay, once per 020 message sent or received
count_key_bits              flows / relay: bits delivered to SAEs, relayed,
                            voided (expired: the keyvault, in keys)
count_keyvault_keys         keyvault.service and its expiry sweeper
track_waiting_take          keyvault.service, around a Take that may wait
register_keyvault_stock     keyvault.__main__ (rows and stock, at scrape)
register_link_state         routing.__main__ (link state, at scrape)
observe_device_call         kme.qkd, every southbound ETSI 014 call
DevicePoller                relay.__main__: device pool level and key rate
                            (kme.devicepoll)
==========================  =================================================
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "DEVICE_KEY_BITS",
    "DEVICE_KEY_RATE",
    "DEVICE_MAX_KEYS",
    "DEVICE_REQUESTS",
    "DEVICE_REQUEST_SECONDS",
    "DEVICE_STORED_KEYS",
    "GRPC_HANDLED",
    "GRPC_HANDLING_SECONDS",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_SECONDS",
    "KEYVAULT_KEYS",
    "KEYVAULT_TAKES_WAITING",
    "KEY_BITS_DELIVERED",
    "KEY_BITS_EXPIRED",
    "KEY_BITS_RELAYED",
    "KEY_BITS_VOIDED",
    "LATENCY_BUCKETS",
    "REGISTRY",
    "RELAY_HOPS",
    "RELAY_HOP_SECONDS",
    "STOCK_KEYS",
    "SUPPLY_WAITING",
    "count_key_bits",
    "count_keyvault_keys",
    "device_bits_taken",
    "observe_device_call",
    "observe_hop",
    "observe_http_request",
    "register_keyvault_stock",
    "register_link_state",
    "track_waiting_take",
]

# One registry per process. The process collector adds CPU seconds, memory
# and open file descriptors of this process (process_*), which the resource
# benchmark otherwise reads from /proc.
# No *_created samples: they double the text of every counter, and Prometheus
# itself needs none of them.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

# Latency buckets from 0.5 ms to 30 s: an enc_keys over one QKD hop takes a
# few ms on a loaded lab machine, a device outage ends at a 10 s timeout.
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                          1.0, 2.5, 5.0, 10.0, 30.0)

# -- requests at the edges (ETSI 014 and 020 listeners) ----------------------------

HTTP_REQUESTS: Final = Counter(
    "kmstn_http_requests_total",
    "ETSI requests answered by this listener, by API, operation and HTTP status",
    ("api", "operation", "status"), registry=REGISTRY)
HTTP_REQUEST_SECONDS: Final = Histogram(
    "kmstn_http_request_duration_seconds",
    "Time from the start of a request's handling to its response, by API, operation and "
    "HTTP status", ("api", "operation", "status"), buckets=LATENCY_BUCKETS, registry=REGISTRY)

# -- gRPC between a node's services ----------------------------------------------

GRPC_HANDLED: Final = Counter(
    "kmstn_grpc_server_handled_total",
    "gRPC calls completed by this server, by service, method and gRPC status code",
    ("grpc_service", "grpc_method", "grpc_code"), registry=REGISTRY)
GRPC_HANDLING_SECONDS: Final = Histogram(
    "kmstn_grpc_server_handling_seconds",
    "Time this server took to handle a unary gRPC call, by service and method",
    ("grpc_service", "grpc_method"), buckets=LATENCY_BUCKETS, registry=REGISTRY)

# -- relay hops (wired by the relay) ----------------------------------------------

RELAY_HOPS: Final = Counter(
    "kmstn_relay_hops_total",
    "ETSI 020 messages this relay sent to or received from a neighbour, by link kind "
    "(qkd, pqc, site), direction (sent, received), message type and outcome",
    ("link_kind", "direction", "message_type", "outcome"), registry=REGISTRY)
RELAY_HOP_SECONDS: Final = Histogram(
    "kmstn_relay_hop_duration_seconds",
    "Time of one hop: sealing, sending and the neighbour's answer (sent), or opening and "
    "deciding (received), by link kind and direction",
    ("link_kind", "direction"), buckets=LATENCY_BUCKETS, registry=REGISTRY)

# -- key bits through the node ----------------------------------------------------

KEY_BITS_DELIVERED: Final = Counter(
    "kmstn_key_delivered_bits_total",
    "Key bits handed to SAEs over ETSI 014, by role of the SAE (master: enc_keys, "
    "slave: dec_keys)", ("role",), registry=REGISTRY)
KEY_BITS_RELAYED: Final = Counter(
    "kmstn_key_relayed_bits_total",
    "Key bits this node sent on toward another node in ETSI 020 ext_keys, by link kind",
    ("link_kind",), registry=REGISTRY)
KEY_BITS_VOIDED: Final = Counter(
    "kmstn_key_voided_bits_total",
    "Key bits voided (ETSI 020 void) by or at this node, by where the void was decided "
    "(local: this node voided its own copy; requested: a neighbour asked)",
    ("origin",), registry=REGISTRY)
KEY_BITS_EXPIRED: Final = Counter(
    "kmstn_key_expired_bits_total",
    "Key bits that expired in this node's keyvault before every SAE took them",
    registry=REGISTRY)

# -- keyvault -------------------------------------------------------------------

KEYVAULT_KEYS: Final = Counter(
    "kmstn_keyvault_keys_total",
    "Keys through the keyvault by event: stored (newly written), taken (copies handed "
    "out), voided, expired", ("event",), registry=REGISTRY)
KEYVAULT_TAKES_WAITING: Final = Gauge(
    "kmstn_keyvault_takes_waiting",
    "Take calls in progress that may wait for keys still in flight (the wait queue)",
    registry=REGISTRY)
KEYVAULT_ROWS: Final = "kmstn_keyvault_rows"
KEYVAULT_STOCK: Final = "kmstn_keyvault_stock_keys"

# -- routing ---------------------------------------------------------------------

LINK_UP: Final = "kmstn_link_up"
LINK_COST: Final = "kmstn_link_cost"

# -- QKD devices (southbound ETSI 014) ---------------------------------------------

DEVICE_REQUESTS: Final = Counter(
    "kmstn_qkd_device_requests_total",
    "Southbound ETSI 014 calls to this node's QKD devices, by link, operation and outcome "
    "(ok or the error code)", ("link", "operation", "outcome"), registry=REGISTRY)
DEVICE_REQUEST_SECONDS: Final = Histogram(
    "kmstn_qkd_device_request_duration_seconds",
    "Time of one southbound ETSI 014 call, retries included, by link and operation",
    ("link", "operation"), buckets=LATENCY_BUCKETS, registry=REGISTRY)
DEVICE_KEY_BITS: Final = Counter(
    "kmstn_qkd_device_key_bits_total",
    "Key bits this process took from its QKD devices, by link and operation (enc_keys: "
    "new keys, dec_keys: keys the other end took first)",
    ("link", "operation"), registry=REGISTRY)
DEVICE_STORED_KEYS: Final = Gauge(
    "kmstn_qkd_device_stored_keys",
    "Keys in the device's store at its last status (ETSI 014 stored_key_count)",
    ("link",), registry=REGISTRY)
DEVICE_MAX_KEYS: Final = Gauge(
    "kmstn_qkd_device_max_keys",
    "Size of the device's store in keys (ETSI 014 max_key_count)",
    ("link",), registry=REGISTRY)
STOCK_KEYS: Final = Gauge(
    "kmstn_stock_keys",
    "Keys ready in a key stock (issue 11), held here and at the destination for one pair",
    ("stock",), registry=REGISTRY)
SUPPLY_WAITING: Final = Gauge(
    "kmstn_supply_waiting_requests",
    "Get key requests waiting for key on a QKD link (issue 11)",
    ("link",), registry=REGISTRY)
DEVICE_KEY_RATE: Final = Gauge(
    "kmstn_qkd_device_key_rate_bits_per_second",
    "Key bits per second entering the device's store, measured by this node over the last "
    "window: change of stored_key_count plus the keys this process took (keys the other "
    "end takes are not seen, and a full store drops new key, so this is a lower bound)",
    ("link",), registry=REGISTRY)


# -- helpers ------------------------------------------------------------------------


def observe_http_request(api: str, operation: str, status: int, seconds: float) -> None:
    """One ETSI request answered (gateway.app)."""
    code = str(status)
    HTTP_REQUESTS.labels(api, operation, code).inc()
    HTTP_REQUEST_SECONDS.labels(api, operation, code).observe(seconds)


LinkKind = Literal["qkd", "pqc", "site"]
Direction = Literal["sent", "received"]


def observe_hop(link_kind: LinkKind, direction: Direction, message_type: str, outcome: str,
                seconds: float | None = None) -> None:
    """One ETSI 020 message over a hop.

    ``message_type``: ext_keys, void, ack, device_keys. ``outcome``: ``ok``,
    or the ErrorCode name of the failure (``UNAVAILABLE``, ``TIMEOUT``,
    ``TAMPERED``, ...), never free text.
    """
    RELAY_HOPS.labels(link_kind, direction, message_type, outcome).inc()
    if seconds is not None:
        RELAY_HOP_SECONDS.labels(link_kind, direction).observe(seconds)


def count_key_bits(event: Literal["delivered", "relayed", "voided", "expired"], bits: int,
                   label: str = "") -> None:
    """Key bits through this node.

    ``label`` is the family's one label: the SAE role (``master``/``slave``)
    for delivered, the link kind for relayed, ``local``/``requested`` for
    voided; none for expired.
    """
    if bits <= 0:
        return
    if event == "delivered":
        KEY_BITS_DELIVERED.labels(label).inc(bits)
    elif event == "relayed":
        KEY_BITS_RELAYED.labels(label).inc(bits)
    elif event == "voided":
        KEY_BITS_VOIDED.labels(label).inc(bits)
    else:
        KEY_BITS_EXPIRED.inc(bits)


def count_keyvault_keys(event: Literal["stored", "taken", "voided", "expired"],
                        count: int) -> None:
    if count > 0:
        KEYVAULT_KEYS.labels(event).inc(count)


@contextlib.contextmanager
def track_waiting_take(may_wait: bool) -> Iterator[None]:
    """Count a Take in the wait queue while it runs, if it is allowed to wait."""
    if not may_wait:
        yield
        return
    KEYVAULT_TAKES_WAITING.inc()
    try:
        yield
    finally:
        KEYVAULT_TAKES_WAITING.dec()


def observe_device_call(link: str, operation: str, outcome: str, seconds: float,
                        key_bits: int = 0) -> None:
    """One southbound call (kme.qkd); ``key_bits`` the key material it returned."""
    DEVICE_REQUESTS.labels(link, operation, outcome).inc()
    DEVICE_REQUEST_SECONDS.labels(link, operation).observe(seconds)
    if key_bits:
        DEVICE_KEY_BITS.labels(link, operation).inc(key_bits)
        with _taken_lock:
            _taken_bits[link] = _taken_bits.get(link, 0) + key_bits


# Key bits taken per link in this process, for DevicePoller's rate (the same
# number as DEVICE_KEY_BITS summed over operations, without its private API).
_taken_bits: dict[str, int] = {}
_taken_lock = threading.Lock()


def device_bits_taken(link: str) -> int:
    with _taken_lock:
        return _taken_bits.get(link, 0)


# -- values read at scrape time -------------------------------------------------------


class _Scraped(Collector):
    """Families whose values are read from a service's own state when scraped.

    A failing read is logged and yields nothing for that scrape (the
    families' absence is the signal), so a scrape never breaks a service.
    """

    def __init__(self, read: Callable[[], Iterable[GaugeMetricFamily]],
                 log: logging.Logger | None) -> None:
        self._read = read
        self._log = log or logging.getLogger("kmstn.metrics")

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            return list(self._read())
        except Exception as exc:
            self._log.warning("metrics read failed", extra={"error": type(exc).__name__})
            return []

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # not known before the first read; the registry then skips checks


def register_keyvault_stock(
        status: Callable[[], tuple[Mapping[tuple[str, str], int], int]],
        log: logging.Logger | None = None) -> Collector:
    """Keyvault rows and stock per (master, slave) SAE pair, from ``Vault.status``."""

    def read() -> Iterator[GaugeMetricFamily]:
        pairs, total = status()
        rows = GaugeMetricFamily(KEYVAULT_ROWS, "Distinct keys waiting in the keyvault for at "
                                 "least one SAE")
        rows.add_metric([], total)
        yield rows
        stock = GaugeMetricFamily(KEYVAULT_STOCK, "Keys each slave SAE can still take, per "
                                  "master and slave SAE", labels=["master_sae", "slave_sae"])
        for (master, slave), n in sorted(pairs.items()):
            stock.add_metric([master, slave], n)
        yield stock

    collector = _Scraped(read, log)
    REGISTRY.register(collector)
    return collector


def register_edge_counters(snapshot: Callable[[], Mapping[str, int]],
                           gauges: Callable[[], Mapping[str, int]],
                           log: logging.Logger | None = None) -> Collector:
    """The ETSI listener's edge (gateway/edge.py): connections refused, dropped or timed
    out, by reason (counters since start), and connections held now, by state."""

    def read() -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        refused = CounterMetricFamily(
            "kmstn_edge_connections_closed", "Connections the edge refused, dropped or timed "
            "out before a worker saw a request, by reason", labels=["reason"])
        for reason, n in sorted(snapshot().items()):
            refused.add_metric([reason], n)
        yield refused
        held = GaugeMetricFamily("kmstn_edge_connections", "Connections the edge holds now, "
                                 "by state", labels=["state"])
        for state, n in sorted(gauges().items()):
            held.add_metric([state], n)
        yield held

    collector = _Scraped(read, log)  # type: ignore[arg-type]
    REGISTRY.register(collector)
    return collector


@dataclass(frozen=True, slots=True)
class LinkView:
    link_id: str
    kind: str
    a: str
    b: str
    up: bool
    cost: float


def register_link_state(links: Callable[[], Iterable[LinkView]],
                        log: logging.Logger | None = None) -> Collector:
    """Link state and cost as this node's routing sees them, read at scrape."""

    def read() -> Iterator[GaugeMetricFamily]:
        labels = ["link", "kind", "a", "b"]
        up = GaugeMetricFamily(LINK_UP, "1 if this node's routing counts the link as up, "
                               "else 0", labels=labels)
        cost = GaugeMetricFamily(LINK_COST, "Routing weight of the link", labels=labels)
        for view in links():
            key = [view.link_id, view.kind, view.a, view.b]
            up.add_metric(key, 1.0 if view.up else 0.0)
            cost.add_metric(key, view.cost)
        yield up
        yield cost

    collector = _Scraped(read, log)
    REGISTRY.register(collector)
    return collector


def unregister(collector: Collector) -> None:
    with contextlib.suppress(KeyError):
        REGISTRY.unregister(collector)
