"""kme.metrics, the [metrics] node table, request IDs over gRPC, the dashboard's arithmetic."""

from __future__ import annotations

import logging
import time
import urllib.request
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.edge import EdgeCounters
from kme import devicepoll, metrics, metricsserver
from kme import log as kmelog
from kme.channels import call
from kme.config import DEFAULT_METRICS_PORTS, ConfigError, load_node_config
from kme.errors import ErrorCode, ErrorInterceptor, KmstnError
from kme.server import ObservingInterceptor
from lab.dashboard import histogram_quantile, parse_exposition
from tests.federation import FederationFiles
from tests.helpers import Pki


def _value(name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metricsserver.exposition().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


# -- the node file ------------------------------------------------------------------


def _node(tmp_path: Path, pki: Pki, **sections: Any) -> Path:
    files = FederationFiles(tmp_path, pki)
    files.kmstn("A")
    files.sae("sae-a", "A")
    files.write()
    return files.node_file("A", **sections)


def test_metrics_ports_default_to_the_table_in_kme_config(tmp_path: Path, pki: Pki) -> None:
    cfg = load_node_config(_node(tmp_path, pki))
    assert dict(cfg.metrics.ports) == dict(DEFAULT_METRICS_PORTS)
    assert cfg.metrics.enabled and cfg.metrics_host == cfg.node.host
    assert len(set(DEFAULT_METRICS_PORTS.values())) == 5


def test_metrics_port_zero_and_overrides(tmp_path: Path, pki: Pki) -> None:
    cfg = load_node_config(_node(tmp_path, pki, metrics={
        "relay_port": 0, "etsi014_port": 9999, "device_poll_s": 0.5}))
    assert cfg.metrics.port("relay") == 0 and cfg.metrics.port("etsi014") == 9999
    assert cfg.metrics.device_poll_s == 0.5


@pytest.mark.parametrize(("table", "field"), [
    ({"routing_port": 70000}, "metrics.routing_port"),
    ({"keyvault_port": 9461}, "metrics.keyvault_port"),  # routing's default
    ({"enabled": "yes"}, "metrics.enabled"),
    ({"prot": 1}, "metrics.prot"),
])
def test_bad_metrics_table_names_the_field(tmp_path: Path, pki: Pki, table: dict[str, Any],
                                           field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_node_config(_node(tmp_path, pki, metrics=table))
    assert err.value.field == field


def test_a_metrics_port_may_not_be_an_etsi_port(tmp_path: Path, pki: Pki) -> None:
    files = FederationFiles(tmp_path, pki)
    node = files.kmstn("A")
    files.sae("sae-a", "A")
    files.write()
    path = files.node_file("A", metrics={"etsi020_port": node["etsi014_port"]})
    with pytest.raises(ConfigError, match="etsi014_port in the topology"):
        load_node_config(path)


# -- request IDs ----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "adopted"), [
    ("5b0c6a3e-1f6b-4f55-9a43-6e8a1b2c3d4e", "5b0c6a3e-1f6b-4f55-9a43-6e8a1b2c3d4e"),
    ("edge.42:x_y", "edge.42:x_y"),
    ("", None), ("x" * 65, None), ("a b", None), ('a"}', None), ("ü", None), (None, None),
])
def test_only_short_url_safe_request_ids_are_adopted(value: Any, adopted: str | None) -> None:
    assert kmelog.adopt_request_id(value) == adopted


def test_request_id_headers_follow_the_log_context() -> None:
    assert kmelog.request_id_headers() == {} and kmelog.request_id_metadata() == ()
    with kmelog.log_context(request_id="r-7"):
        assert kmelog.request_id_headers() == {"X-Request-ID": "r-7"}
        assert kmelog.request_id_metadata() == (("x-request-id", "r-7"),)


def _server(handler: Any) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[ObservingInterceptor(),
                                       ErrorInterceptor(logging.getLogger("test"))])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.v1.Echo", {
        "Who": grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=bytes, response_serializer=bytes)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_the_request_id_crosses_grpc_into_the_handlers_log_context() -> None:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"fail":
            raise KmstnError(ErrorCode.KEY_NOT_FOUND, "no such key")
        return (kmelog.current_request_id() or "none").encode()

    server, port = _server(who)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary("/test.v1.Echo/Who", request_serializer=bytes,
                               response_deserializer=bytes)
    before = {c: _value("kmstn_grpc_server_handled_total", grpc_service="test.v1.Echo",
                        grpc_method="Who", grpc_code=c) for c in ("OK", "NOT_FOUND")}
    try:
        with kmelog.log_context(request_id="edge-1234"):
            assert call(stub, b"", 5) == b"edge-1234"
            with pytest.raises(KmstnError) as err:
                call(stub, b"fail", 5)
            assert err.value.code is ErrorCode.KEY_NOT_FOUND
        assert call(stub, b"", 5) == b"none"  # no ID outside a request
    finally:
        channel.close()
        server.stop(0)
    after = {c: _value("kmstn_grpc_server_handled_total", grpc_service="test.v1.Echo",
                       grpc_method="Who", grpc_code=c) for c in ("OK", "NOT_FOUND")}
    assert after["OK"] - before["OK"] == 2
    assert after["NOT_FOUND"] - before["NOT_FOUND"] == 1


# -- families, helpers, the listener --------------------------------------------------


def test_every_family_of_the_issue_is_defined_with_conventional_names() -> None:
    text = metricsserver.exposition().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    # Counters are exposed without their _total suffix in the family name.
    for family in ("kmstn_http_requests", "kmstn_http_request_duration_seconds",
                   "kmstn_grpc_server_handled", "kmstn_grpc_server_handling_seconds",
                   "kmstn_relay_hops", "kmstn_relay_hop_duration_seconds",
                   "kmstn_key_delivered_bits", "kmstn_key_relayed_bits",
                   "kmstn_key_voided_bits", "kmstn_key_expired_bits",
                   "kmstn_keyvault_keys", "kmstn_keyvault_takes_waiting",
                   "kmstn_qkd_device_requests", "kmstn_qkd_device_request_duration_seconds",
                   "kmstn_qkd_device_key_bits", "kmstn_qkd_device_stored_keys",
                   "kmstn_qkd_device_max_keys", "kmstn_qkd_device_key_rate_bits_per_second"):
        assert family in names, family
    assert "# TYPE kmstn_relay_hops_total counter" in text


def test_helpers_move_exactly_their_counters() -> None:
    hop = {"link_kind": "qkd", "direction": "sent", "message_type": "ext_keys",
           "outcome": "ok"}
    before = _value("kmstn_relay_hops_total", **hop)
    metrics.observe_hop("qkd", "sent", "ext_keys", "ok", 0.01)
    assert _value("kmstn_relay_hops_total", **hop) == before + 1
    bits = _value("kmstn_key_relayed_bits_total", link_kind="pqc")
    metrics.count_key_bits("relayed", 768, "pqc")
    metrics.count_key_bits("relayed", 0, "pqc")
    assert _value("kmstn_key_relayed_bits_total", link_kind="pqc") == bits + 768
    expired = _value("kmstn_key_expired_bits_total")
    metrics.count_key_bits("expired", 256)
    assert _value("kmstn_key_expired_bits_total") == expired + 256
    waiting = _value("kmstn_keyvault_takes_waiting")
    with metrics.track_waiting_take(True):
        assert _value("kmstn_keyvault_takes_waiting") == waiting + 1
        with metrics.track_waiting_take(False):
            assert _value("kmstn_keyvault_takes_waiting") == waiting + 1
    assert _value("kmstn_keyvault_takes_waiting") == waiting


def test_scraped_families_and_a_failing_read() -> None:
    stock = metrics.register_keyvault_stock(lambda: ({("m", "s1"): 3, ("m", "s2"): 1}, 3))
    links = metrics.register_link_state(lambda: [
        metrics.LinkView("QKD-1", "qkd", "A", "B", True, 1.0),
        metrics.LinkView("PQC-1", "pqc", "B", "C", False, 2.5)])
    try:
        assert _value("kmstn_keyvault_rows") == 3
        assert _value("kmstn_keyvault_stock_keys", master_sae="m", slave_sae="s1") == 3
        assert _value("kmstn_link_up", link="PQC-1", kind="pqc", a="B", b="C") == 0
        assert _value("kmstn_link_cost", link="PQC-1", kind="pqc", a="B", b="C") == 2.5
    finally:
        metrics.unregister(stock)
        metrics.unregister(links)

    def broken() -> tuple[dict[tuple[str, str], int], int]:
        raise OSError("vault closed")

    failing = metrics.register_keyvault_stock(broken)
    try:
        assert "kmstn_keyvault_rows" not in metricsserver.exposition().decode()
    finally:
        metrics.unregister(failing)


@dataclass
class _Status:
    stored_key_count: int
    max_key_count: int = 1000
    key_size: int = 256


class _FakeDevice:
    def __init__(self, link_id: str) -> None:
        self.link_id = link_id
        self.stored = 100
        self.fail = False

    def status(self) -> _Status:
        if self.fail:
            raise KmstnError(ErrorCode.UNAVAILABLE, "the QKD device is unreachable")
        return _Status(self.stored)


def test_device_poller_measures_inflow_including_the_keys_this_process_took() -> None:
    clock = [0.0]
    device = _FakeDevice("QKD-poll")
    poller = devicepoll.DevicePoller([device], 1.0, logging.getLogger("test"), window_s=10,
                                  clock=lambda: clock[0])
    poller.poll_once()
    assert _value("kmstn_qkd_device_stored_keys", link="QKD-poll") == 100
    assert _value("kmstn_qkd_device_max_keys", link="QKD-poll") == 1000
    # 2 s later: 10 keys more in the store although this process took 4 keys.
    clock[0] = 2.0
    device.stored = 110
    metrics.observe_device_call("QKD-poll", "enc_keys", "ok", 0.001, key_bits=4 * 256)
    poller.poll_once()
    assert _value("kmstn_qkd_device_key_rate_bits_per_second",
                  link="QKD-poll") == (10 + 4) * 256 / 2
    # A failing device leaves the last values and does not stop the poller.
    device.fail = True
    clock[0] = 3.0
    poller.poll_once()
    assert _value("kmstn_qkd_device_stored_keys", link="QKD-poll") == 110


def test_metrics_listener_serves_the_text_format_on_an_ephemeral_port() -> None:
    server = metricsserver.start_metrics_server("127.0.0.1", [0], logging.getLogger("test"))
    assert server is not None and server.port > 0
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(server.url, timeout=5) as resp:
            body = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert "kmstn_http_requests_total" in body or "kmstn_http_requests" in body
        # Taken: the next listener on the same port fails softly (None, logged).
        assert metricsserver.start_metrics_server("127.0.0.1", [server.port],
                                            logging.getLogger("test")) is None
    finally:
        server.close()


def test_exposition_costs_little(capsys: pytest.CaptureFixture[str]) -> None:
    # Not timed: that one observation and one scrape work, and print nothing.
    metrics.observe_http_request("etsi014", "status", 200, 0.001)
    assert metricsserver.exposition().startswith(b"# HELP")
    assert capsys.readouterr().out == ""


# -- the dashboard's arithmetic ---------------------------------------------------------


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    inf = float("inf")
    assert histogram_quantile(0.5, {0.1: 0, 0.2: 10, inf: 10}) == pytest.approx(0.15)
    assert histogram_quantile(0.5, {0.1: 5, 0.2: 5, inf: 10}) == pytest.approx(0.1)
    assert histogram_quantile(0.5, {0.1: 2, 0.2: 4, inf: 10}) == 0.2  # beyond: last edge
    assert histogram_quantile(0.5, {0.1: 0, inf: 0}) is None


def test_parse_exposition_reads_our_own_output() -> None:
    metrics.observe_http_request("etsi020", "ext_keys", 503, 0.2)
    scrape = parse_exposition(metricsserver.exposition().decode(), time.monotonic())
    got = scrape.values("kmstn_http_requests_total", api="etsi020", operation="ext_keys",
                        status="503")
    assert got and got[0][1] >= 1


def test_the_edge_counts_closed_connections_by_reason_and_holds_by_state() -> None:
    counters = EdgeCounters()
    collector = metrics.register_edge_counters(counters.snapshot, lambda: dict(counters.gauges))
    try:
        counters.add("handshake_timeout", 3)
        counters.add("refused_handshake_per_source")
        counters.gauges = {"handshaking": 2, "idle": 5}
        assert _value("kmstn_edge_connections_closed_total", reason="handshake_timeout") == 3
        assert _value("kmstn_edge_connections_closed_total",
                      reason="refused_handshake_per_source") == 1
        assert _value("kmstn_edge_connections", state="idle") == 5
    finally:
        metrics.unregister(collector)
