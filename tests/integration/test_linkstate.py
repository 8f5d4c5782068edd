"""Issue 12 acceptance: a federation that runs itself.

The mesh (examples/mesh.toml) and the paper's testbed come up from per-node
files alone, none naming a node beyond its neighbours; routes, SAEs and costs
are learned from signed link state. Records a neighbour sends that are
forged, replayed or tampered are refused (and the sender named in the log),
and nobody routes over a link only a forgery claims. When a QKD link's
devices are killed while keys flow, keys take another path, and every key a
master got is taken once, with its bytes, and none is left behind. Real
processes on 127.0.0.x, real swtpm, SQLCipher and mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import tomllib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import NameOID

from kme.channels import internal_channel, mtls_channel
from kme.config import TlsFiles, load_node_config, load_topology
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.types import NodeId
from lab.failover import run_failover
from lab.federation import Federation
from routing.client import RoutingClient
from routing.records import AnnouncedLink, Record, Signed, Signer
from tests.helpers import run_cli
from tests.mesh import Mesh, start_mesh
from tests.testbed import Testbed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with start_mesh() as federation:
        yield federation


def _mentioned(doc: dict[str, Any]) -> set[str]:
    names = {k["id"] for k in doc.get("kmstn", [])}
    for table in ("qkd_link", "pqc_link", "site_link"):
        for link in doc.get(table, []):
            names |= {link["a"], link["b"]}
    return names | {s["kmstn"] for s in doc.get("sae", [])}


def assert_runs_from_node_files_alone(fed: Federation) -> None:
    """Every node process was started from its own per-node file, and no node file, no
    process and no emulator names the topology or a node beyond a node's neighbours."""
    lab = load_topology(fed.topology_path)
    kmstns = [n for n, k in lab.kmstns.items() if k.kind == "kmstn"]
    for node in kmstns:
        with fed.node_file(node).open("rb") as fh:
            doc = tomllib.load(fh)
        assert "topology" not in doc
        near = {link.other(node) for link in lab.links_of(node)}  # type: ignore[arg-type]
        assert _mentioned(doc) <= {node} | near, node
        assert str(fed.topology_path) not in fed.node_file(node).read_text()
        # What the node knows of others beyond its file, it learned and verified.
        cfg = load_node_config(fed.node_file(node))
        assert cfg.linkstate is not None
        view = RoutingClient(internal_channel(cfg, "routing"), timeout=5).link_state_database()
        assert view.mode == "learned"
        assert {e.record.origin_node_id for e in view.entries} == set(kmstns)
        assert all(e.signature.startswith("verified: ML-DSA-65, certificate CN="
                                          f"{e.record.origin_node_id} ") for e in view.entries)
    pids = json.loads(fed.pids_path.read_text())
    for name, info in pids.items():
        argv = " ".join(info["argv"])
        assert "topology" not in argv, name
        node = name.split("/")[0]
        if node in kmstns:
            assert info["argv"][-1] == str(fed.node_file(node)), name
    for sim in (fed.state / "sim").glob("*.toml"):
        with sim.open("rb") as fh:
            assert "topology" not in tomllib.load(fh)


def test_the_mesh_comes_up_from_per_node_files_alone(mesh: Mesh) -> None:
    assert_runs_from_node_files_alone(mesh.federation)
    # W1's file names W2 and W4 only; its route to E2 crosses four nodes it never heard of
    # from its file, over the cheapest path, with every hop's cost terms.
    got = run_cli(["-m", "kme", "route", "--config", str(mesh.node_file("W1")), "sae-e2"])
    assert got.returncode == 0, got.stderr
    route = json.loads(got.stdout)
    assert route["path"] == ["W1", "W2", "E1", "E2"]
    assert [h["kind"] for h in route["hops"]] == ["qkd", "pqc", "qkd"]
    assert route["total_cost"] == 4.0
    pqc = route["hops"][1]
    assert set(pqc["announced_by"]) == {"W2", "E1"}
    assert all(end["configured_cost"] == 2.0 for end in pqc["announced_by"].values())
    assert route["hops"][0]["announced_by"]["W1"]["nominal_rate_bps"] == 200000.0


def test_the_testbed_comes_up_from_per_node_files_alone(testbed: Testbed) -> None:
    assert_runs_from_node_files_alone(testbed.federation)
    got = run_cli(["-m", "kme", "route", "--config", str(testbed.node_file("KMSTN1")), "SAE8"])
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["path"] == [f"KMSTN{i}" for i in range(1, 9)]


def test_kmstn_topology_shows_records_with_origin_age_and_signature(mesh: Mesh) -> None:
    got = run_cli(["-m", "kme", "topology", "--config", str(mesh.node_file("T"))])
    assert got.returncode == 0, got.stderr
    view = json.loads(got.stdout)
    assert view["self"] == "T" and view["mode"] == "learned"
    records = {r["origin"]: r for r in view["records"]}
    assert set(records) == {"W1", "W2", "W3", "W4", "T", "E1", "E2"}
    assert records["T"]["received_from"] == "(own)"
    assert records["W1"]["received_from"] in ("W3", "E2")  # T's neighbours
    for r in records.values():
        assert 0 <= r["age_s"] < 300
        assert r["signature"].startswith(f"verified: ML-DSA-65, certificate CN={r['origin']} ")
    assert records["E2"]["saes"] == ["sae-e2"]
    ring = {link["link"]: link for link in records["W1"]["links"]}
    assert set(ring) == {"QKD-W1-W2", "QKD-W4-W1"}
    assert ring["QKD-W4-W1"]["configured_cost"] == 1.1 and ring["QKD-W4-W1"]["up"]
    links = {link["id"]: link for link in view["links"]}
    assert len(links) == 8 and all(link["up"] for link in links.values())


# -- records a neighbour sends -------------------------------------------------------------


def _as_neighbour(mesh: Mesh, me: str, target: str) -> relay_pb2_grpc.RelayPeerStub:
    """The RelayPeer of ``target`` called with ``me``'s own node certificate (mutual TLS)."""
    cfg = load_node_config(mesh.node_file(target))
    certs = mesh.state / "pki" / "certs"
    tls = TlsFiles(mesh.state / "pki" / "ca.pem", certs / f"{me}.pem", certs / f"{me}.key")
    channel = mtls_channel(f"{cfg.node.host}:{cfg.node.relay_port}", tls)
    return relay_pb2_grpc.RelayPeerStub(channel)


def _refused(mesh: Mesh, node: str) -> list[Any]:
    cfg = load_node_config(mesh.node_file(node))
    return list(RoutingClient(internal_channel(cfg, "routing"), timeout=5)
                .link_state_database().refused)


def _route(mesh: Mesh, node: str, sae: str) -> tuple[str, ...]:
    cfg = load_node_config(mesh.node_file(node))
    return tuple(RoutingClient(internal_channel(cfg, "routing"), timeout=5)
                 .route_to_sae(sae).path)


def _rogue_signer(node: str) -> Signer:
    """A key for ``node`` certified by a CA the federation does not pin (same CA name)."""
    ca_key = mldsa.MLDSA65PrivateKey.generate()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kmstn link-state CA")])
    key = mldsa.MLDSA65PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(42)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1)).sign(ca_key, None))
    return Signer(key, cert)


def _wait_refused(mesh: Mesh, node: str, reason: str) -> Any:
    for _ in range(200):
        found = [r for r in _refused(mesh, node) if r.reason.startswith(reason)]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{node} never refused a record for {reason!r}: {_refused(mesh, node)}")


def test_forged_replayed_and_tampered_records_from_a_neighbour_are_refused(mesh: Mesh) -> None:
    before = _route(mesh, "W1", "sae-e2")
    w2 = _as_neighbour(mesh, "W2", "W1")
    held = w2.SyncLinkState(relay_pb2.SyncLinkStateRequest(), timeout=10)
    records = {Signed.from_proto(r).peek_header()[0]: Signed.from_proto(r) for r in held.records}
    assert set(records) == {"W1", "W2", "W3", "W4", "T", "E1", "E2"}

    # Forged: "E2" claims a direct, nearly free link to W1; W1's own record is forged
    # to claim the other end, so both ends seem to agree.
    now = int(time.time() * 1000)
    fake_e2 = Record(NodeId("E2"), now + 10**9, now, 300, "mesh", (), (
        AnnouncedLink("QKD-E1-E2", NodeId("E1"), "qkd", True, 1.0, 1.0),
        AnnouncedLink("SHORTCUT", NodeId("W1"), "pqc", True, 0.01, 0.01)))
    fake_w1 = Record(NodeId("W1"), now + 10**9, now, 300, "mesh", (), (
        AnnouncedLink("SHORTCUT", NodeId("E2"), "pqc", True, 0.01, 0.01),))
    forged = [_rogue_signer("E2").sign(fake_e2), _rogue_signer("W1").sign(fake_w1)]
    w2.Flood(relay_pb2.FloodRequest(records=[f.to_proto() for f in forged]), timeout=10)
    refusal = _wait_refused(mesh, "W1", "certificate signature does not verify")
    assert refusal.from_node_id == "W2"
    # Forged records are never passed on, and nobody routes over the shortcut.
    time.sleep(1.0)
    assert _route(mesh, "W1", "sae-e2") == before
    for node in ("W1", "W4", "E2"):
        got = json.loads(run_cli(["-m", "kme", "topology", "--config",
                                  str(mesh.node_file(node))]).stdout)
        assert "SHORTCUT" not in {link["id"] for link in got["links"]}, node
        assert all(r["sequence"] < now + 10**9 for r in got["records"]), node

    # Tampered: one byte of W3's genuine record changed.
    genuine = records["W3"]
    body = bytearray(genuine.record)
    body[len(body) // 2] ^= 0x01
    tampered = Signed(bytes(body), genuine.signature, genuine.certificate)
    w2.Flood(relay_pb2.FloodRequest(records=[tampered.to_proto()]), timeout=10)
    assert _wait_refused(mesh, "W1", "bad signature").from_node_id == "W2"

    # Replayed: W3 signs a new record (an operator re-costs one of its links to what it
    # was), then the old one comes back.
    old_seq = genuine.peek_header()[1]
    run = run_cli(["-m", "kme", "link", "--config", str(mesh.node_file("W3")), "QKD-W3-W4",
                   "up", "--cost", "1.0"])
    assert run.returncode == 0, run.stderr
    for _ in range(200):
        fresh = {Signed.from_proto(r).peek_header() for r in w2.SyncLinkState(
            relay_pb2.SyncLinkStateRequest(), timeout=10).records}
        if any(o == "W3" and s > old_seq for o, s in fresh):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("W3's new record never reached W1")
    w2.Flood(relay_pb2.FloodRequest(records=[genuine.to_proto()]), timeout=10)
    replay = _wait_refused(mesh, "W1", f"replayed: sequence {old_seq} not above")
    assert (replay.from_node_id, replay.origin_node_id) == ("W2", "W3")
    assert _route(mesh, "W1", "sae-e2") == before

    # The routing log names the sender of each forgery.
    log = (mesh.state / "logs" / "W1-routing.log").read_text().splitlines()
    warned = [json.loads(line) for line in log if '"link-state record refused"' in line]
    assert {(w["peer"], w["reason"]) for w in warned if w["level"] == "warning"} >= {
        ("W2", "certificate signature does not verify with the link-state CA"),
        ("W2", "bad signature")}

    # A node that is not a neighbour cannot even hand records in.
    e2 = _as_neighbour(mesh, "E2", "W1")
    with pytest.raises(grpc.RpcError) as err:
        e2.Flood(relay_pb2.FloodRequest(records=[genuine.to_proto()]), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_keys_take_another_path_when_a_qkd_links_devices_stop(mesh: Mesh) -> None:
    """Devices of QKD-W1-W2 killed while sae-w1 draws keys for sae-e2: keys go around the
    ring; every key the master got is taken once with its bytes, none is left behind."""
    topology = load_topology(mesh.federation.topology_path)
    run = run_failover(mesh.federation, mesh.manifest, topology, "QKD-W1-W2", "sae-w1",
                       "sae-e2", warm_s=2.0, after_s=6.0)
    assert run.path_before == ("W1", "W2", "E1", "E2")
    assert run.path_after == ("W1", "W4", "W3", "W2", "E1", "E2")
    assert run.keys_before > 0 and run.keys_after > 0
    assert run.first_new_s is not None  # some key crossed W4 after the fault
    assert (run.mismatched, run.taken_twice, run.left_in_vaults) == (0, 0, 0)
    # The devices are back: once held up long enough (no flapping), the short path again.
    for _ in range(300):
        if _route(mesh, "W1", "sae-e2") == ("W1", "W2", "E1", "E2"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("W1 never went back to the short path")
