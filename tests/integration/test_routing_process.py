"""A real ``python -m routing`` process (health, Route, link state, SIGTERM), and exit 78
and --check-config for every node service."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kme.channels import LOCAL_OPTIONS
from kme.config import load_node_config
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import common_pb2, routing_pb2, routing_pb2_grpc
from routing.client import RoutingClient
from routing.follower import TableFollower
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


def test_follower_follows_link_changes_without_a_route_rpc(
        three_nodes: FederationFiles) -> None:
    """Routing.WatchTable keeps an in-process forwarding table current: a link change made
    at the service pushes a new table version, which changes the follower's routes within
    moments, with no restart."""
    node_file = three_nodes.node_file("A")
    cfg = load_node_config(node_file)
    proc = ServiceProcess(["-m", "routing", "--config", str(node_file)], three_nodes.root,
                          "routing")
    try:
        proc.wait_healthy(cfg.routing_endpoint.grpc_target)
        with grpc.insecure_channel(cfg.routing_endpoint.grpc_target) as channel:
            follower = TableFollower(channel, heartbeat_s=1)
            assert follower.wait_synced(10)
            first = follower.version
            assert first >= 1
            assert follower.route_to_sae("sae-c").path == ("A", "B", "C")
            assert follower.route_to_sae("sae-c") == RoutingClient(channel).route_to_sae("sae-c")
            RoutingClient(channel).set_link_state("PQC-B-C", up=False)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    follower.route_to_sae("sae-c")
                except KmstnError as exc:
                    assert exc.code is ErrorCode.NO_ROUTE
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the follower never saw the link go down")
            assert follower.version == first + 1
            assert follower.synced
            table = follower.table
            assert table is not None and table.entry("C").cut == ("PQC-B-C",)
            with pytest.raises(KmstnError) as err:
                follower.route_to_sae("sae-c")
            assert err.value.public == "no path from A to C: cut by links down: PQC-B-C"
            RoutingClient(channel).set_link_state("PQC-B-C", up=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _routes(follower):
                time.sleep(0.01)
            assert follower.route_to_sae("sae-c").path == ("A", "B", "C")
            assert follower.version == first + 2
            follower.close()
    finally:
        assert proc.stop() == 0, proc.logs()


def test_follower_asks_the_service_while_out_of_sync_and_resyncs_after_a_restart(
        three_nodes: FederationFiles) -> None:
    """While the routing service is down the follower does not answer from its last table:
    a route asked then waits, within its deadline, for the restarted service; the stream
    comes back by itself and the new service's table (fresh link state) is followed."""
    node_file = three_nodes.node_file("A")
    cfg = load_node_config(node_file)
    target = cfg.routing_endpoint.grpc_target
    args = ["-m", "routing", "--config", str(node_file)]
    proc = ServiceProcess(args, three_nodes.root, "routing")
    channel = grpc.insecure_channel(target, options=LOCAL_OPTIONS)
    follower = TableFollower(channel, heartbeat_s=1, rpc_timeout=60)
    try:
        proc.wait_healthy(target)
        assert follower.wait_synced(10)
        RoutingClient(channel).set_link_state("PQC-B-C", up=False)
        _wait_until(lambda: follower.version == 2)
        assert follower.node_of_sae("sae-c") == "C"
        assert proc.stop() == 0, proc.logs()

        _wait_until(lambda: not follower.synced)
        assert follower.table is None
        # The stale table would answer NO_ROUTE; the follower asks the service
        # instead, and that call waits for the service started meanwhile.
        answers: list[object] = []
        asking = threading.Thread(target=lambda: answers.append(_answer(follower)))
        asking.start()
        proc = ServiceProcess(args, three_nodes.root, "routing-2")
        asking.join(90)
        assert answers and answers[0] == ("A", "B", "C")

        # The restarted service starts again from the configured link state.
        assert follower.wait_synced(30)
        assert follower.route_to_sae("sae-c").path == ("A", "B", "C")
        assert follower.version == 1
        RoutingClient(channel).set_link_state("QKD-A-B", up=False)
        _wait_until(lambda: follower.version == 2)
        with pytest.raises(KmstnError) as err:
            follower.route_to_node("B")
        assert err.value.public == "no path from A to B: cut by links down: QKD-A-B"
        with pytest.raises(KmstnError) as err:
            follower.route_to_sae("nobody")
        assert err.value.code is ErrorCode.UNKNOWN_SAE
    finally:
        follower.close()
        channel.close()
        assert proc.stop() == 0, proc.logs()


def test_follower_stops_trusting_a_silent_stream(three_nodes: FederationFiles) -> None:
    """A routing service that hangs (SIGSTOP) sends no heartbeat: after two heartbeats the
    follower is out of sync (routes would be asked over RPC), and in sync again once the
    service runs again."""
    node_file = three_nodes.node_file("A")
    cfg = load_node_config(node_file)
    proc = ServiceProcess(["-m", "routing", "--config", str(node_file)], three_nodes.root,
                          "routing")
    channel = grpc.insecure_channel(cfg.routing_endpoint.grpc_target, options=LOCAL_OPTIONS)
    follower = TableFollower(channel, heartbeat_s=1)
    try:
        proc.wait_healthy(cfg.routing_endpoint.grpc_target)
        assert follower.wait_synced(10)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            _wait_until(lambda: not follower.synced)
            assert follower.table is None
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert follower.wait_synced(30)
        assert follower.route_to_sae("sae-c").path == ("A", "B", "C")
    finally:
        follower.close()
        channel.close()
        assert proc.stop() == 0, proc.logs()


def _answer(follower: TableFollower) -> object:
    try:
        return follower.route_to_sae("sae-c").path
    except KmstnError as exc:
        return exc


def _wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _routes(follower: TableFollower) -> bool:
    try:
        follower.route_to_sae("sae-c")
    except KmstnError:
        return False
    return True
