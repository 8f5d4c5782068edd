"""A real ``python -m routing`` process (health, Route, link state, SIGTERM), and exit 78
and --check-config for every node service."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import grpc
import pytest

from kme.config import load_node_config
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import common_pb2, routing_pb2, routing_pb2_grpc
from routing.client import RoutingClient
from tests.federation import FederationFiles
from tests.helpers import Pki, ServiceProcess, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def three_nodes(short_tmp: Path, pki: Pki) -> FederationFiles:
    fed = FederationFiles(short_tmp, pki)
    for n, host in (("A", "127.0.0.21"), ("B", "127.0.0.22"), ("C", "127.0.0.23")):
        fed.kmstn(n, host)
    fed.qkd("A", "B")
    fed.pqc("B", "C")
    fed.sae("sae-a", "A")
    fed.sae("sae-c", "C")
    fed.write()
    return fed


def test_routing_process_serves_and_stops_cleanly(three_nodes: FederationFiles) -> None:
    node_file = three_nodes.node_file("A")
    cfg = load_node_config(node_file)
    target = cfg.routing_endpoint.grpc_target
    proc = ServiceProcess(["-m", "routing", "--config", str(node_file)], three_nodes.root,
                          "routing")
    try:
        proc.wait_healthy(target)
        proc.wait_healthy(target, service="kme.rpc.v1.Routing")
        sock = Path(cfg.routing_endpoint.address)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        with grpc.insecure_channel(target) as channel:
            stub = routing_pb2_grpc.RoutingStub(channel)
            route = stub.Route(routing_pb2.RouteRequest(sae_id="sae-c"), timeout=5)
            assert list(route.path) == ["A", "B", "C"]
            assert route.next_hop_node_id == "B"
            assert route.next_hop_kind == common_pb2.LINK_KIND_QKD
            assert [h.kind for h in route.hops] == [common_pb2.LINK_KIND_QKD,
                                                    common_pb2.LINK_KIND_PQC]

            client = RoutingClient(channel)
            with pytest.raises(KmstnError) as err:
                client.route_to_sae("nobody")
            assert err.value.code is ErrorCode.UNKNOWN_SAE

            # A link goes down at run time: no restart, the next call sees it.
            client.set_link_state("PQC-B-C", up=False)
            with pytest.raises(KmstnError) as err:
                client.route_to_sae("sae-c")
            assert err.value.code is ErrorCode.NO_ROUTE
            assert "PQC-B-C" in err.value.public
            with pytest.raises(grpc.RpcError) as rpc_err:
                stub.Route(routing_pb2.RouteRequest(sae_id="sae-c"), timeout=5)
            assert rpc_err.value.code() == grpc.StatusCode.UNAVAILABLE
            client.set_link_state("PQC-B-C", up=True)
            assert client.route_to_sae("sae-c").path == ("A", "B", "C")

            # The operator's CLI drives the same service.
            cli = run_cli(["-m", "kme", "link", "--config", str(node_file), "QKD-A-B", "down"])
            assert cli.returncode == 0, cli.stderr
            cli = run_cli(["-m", "kme", "route", "--config", str(node_file), "sae-c"])
            assert cli.returncode == 1
            assert "NO_ROUTE: no path from A to C: cut by links down: QKD-A-B" in cli.stderr
            run_cli(["-m", "kme", "link", "--config", str(node_file), "QKD-A-B", "up"])
            cli = run_cli(["-m", "kme", "route", "--config", str(node_file), "sae-c"])
            assert json.loads(cli.stdout)["path"] == ["A", "B", "C"]

            snapshot = client.topology()
            assert snapshot.self_node_id == "A"
            assert {n.node_id for n in snapshot.nodes} == {"A", "B", "C"}
    finally:
        code = proc.stop()
    assert code == 0, proc.logs()
    lines = [json.loads(line) for line in proc.stdout_path.read_text().splitlines()]
    assert all(line["service"] == "routing" and line["node"] == "A" for line in lines)
    assert any(line["msg"] == "listening" for line in lines)
    assert lines[-1]["msg"] == "stopped"


# Every node service starts through kme.config.load_or_exit.
SERVICES = [["-m", "routing"], ["-m", "keyvault"], ["-m", "relay"],
            ["-m", "gateway", "--api", "etsi014"], ["-m", "gateway", "--api", "etsi020"]]


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: "-".join(s[1:]))
def test_bad_config_exits_78_naming_the_field(three_nodes: FederationFiles,
                                              service: list[str]) -> None:
    node_file = three_nodes.node_file("A", gateway={"delivery": "sometimes"})
    result = run_cli([*service, "--config", str(node_file)])
    assert result.returncode == 78
    assert f"{node_file}: gateway.delivery: must be one of" in result.stderr
    assert result.stderr.startswith(f"kmstn-{service[1]}: configuration error: ")


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: "-".join(s[1:]))
def test_check_config(three_nodes: FederationFiles, service: list[str]) -> None:
    node_file = three_nodes.node_file("B")
    result = run_cli([*service, "--config", str(node_file), "--check-config"])
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    # --check-config starts nothing: no socket appears.
    cfg = load_node_config(node_file)
    for endpoint in (cfg.routing_endpoint, cfg.keyvault_endpoint, cfg.relay_endpoint):
        assert not Path(endpoint.address).exists()


def test_replica_follows_link_changes_without_a_route_rpc(three_nodes: FederationFiles) -> None:
    """Routing.Watch keeps an in-process replica current: a link change made at the
    service changes the replica's routes within moments, with no restart."""
    from routing.replica import RoutingReplica

    node_file = three_nodes.node_file("A")
    cfg = load_node_config(node_file)
    proc = ServiceProcess(["-m", "routing", "--config", str(node_file)], three_nodes.root,
                          "routing")
    try:
        proc.wait_healthy(cfg.routing_endpoint.grpc_target)
        with grpc.insecure_channel(cfg.routing_endpoint.grpc_target) as channel:
            replica = RoutingReplica(cfg.topology, cfg.node_id, channel, heartbeat_s=1)
            assert replica.wait_synced(10)
            assert replica.route_to_sae("sae-c").path == ("A", "B", "C")
            RoutingClient(channel).set_link_state("PQC-B-C", up=False)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    replica.route_to_sae("sae-c")
                except KmstnError as exc:
                    assert exc.code is ErrorCode.NO_ROUTE
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the replica never saw the link go down")
            RoutingClient(channel).set_link_state("PQC-B-C", up=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _routes(replica):
                time.sleep(0.01)
            assert replica.route_to_sae("sae-c").path == ("A", "B", "C")
            replica.close()
    finally:
        assert proc.stop() == 0, proc.logs()


def _routes(replica: object) -> bool:
    try:
        replica.route_to_sae("sae-c")  # type: ignore[attr-defined]
    except KmstnError:
        return False
    return True
