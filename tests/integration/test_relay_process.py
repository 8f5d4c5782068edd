"""Two real ``python -m relay`` processes exchanging sealed messages over one hop.

A seals through its internal gRPC socket, B opens through its own; the KEM
exchange runs between them on their relay ports over mutual TLS. Over a PQC
hop and over a QKD hop (with the emulated devices of ``python -m
lab.qkdsim``): 1,000 messages each open to the original bytes, every replay
is rejected, and the sender's record (its ``sealed`` log lines) never names a
session twice. No secret reaches either process's log.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from kme.config import NodeConfig, QkdLink, load_node_config
from kme.errors import ErrorCode, KmstnError
from kme.rpc.v1 import relay_pb2, relay_pb2_grpc
from kme.types import NodeId, SaeId, SecretBytes
from lab.pki import Issued
from relay import envelope as env
from relay import kem
from relay.client import RelayClient
from relay.hopkey import combine
from relay.peer import RelayPeerClient, peer_channel
from tests.federation import FederationFiles
from tests.helpers import Pki, ServiceProcess

pytestmark = pytest.mark.integration

MESSAGES = 1000


@pytest.fixture
def pki(short_tmp: Path) -> Pki:
    """A CA per test: the session-wide one caches certificates by name, and
    other tests issue "A" or "QKD-A-B-alice" for other addresses."""
    return Pki(short_tmp / "pki")


@dataclass
class RelayNode:
    name: str
    config: NodeConfig
    proc: ServiceProcess
    channel: grpc.Channel

    @property
    def client(self) -> RelayClient:
        return RelayClient(self.channel, timeout=20)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.proc.stdout_path.read_text().splitlines()
                if line.startswith("{")]

    def stop(self) -> int:
        self.channel.close()
        return self.proc.stop()


def start_relay(fed: FederationFiles, name: str) -> RelayNode:
    # Debug level, so that the canary checks cover every line the relay can write.
    node_file = fed.node_file(name, relay={"kem_pool_size": 16, "session_ttl_s": 120},
                              log={"level": "debug"})
    config = load_node_config(node_file)
    proc = ServiceProcess(["-m", "relay", "--config", str(node_file)], fed.root / name,
                          f"relay-{name}")
    target = config.relay_endpoint.grpc_target
    try:
        proc.wait_healthy(target)
        proc.wait_healthy(target, service="kme.rpc.v1.RelayPeer")
    except BaseException:
        proc.kill()
        raise
    return RelayNode(name, config, proc, grpc.insecure_channel(target))


def etsi_body(i: int) -> tuple[bytes, bytes]:
    """An ETSI 020 ext_keys-like body holding a fresh 256-bit key (the canary)."""
    secret = os.urandom(32)
    doc = {"keys": [{"key_ID": str(uuid.uuid4()), "key": base64.b64encode(secret).decode(),
                     "size": 256}], "initiator_sae_id": "sae-a", "target_sae_ids": ["sae-b"],
           "seq": i}
    return json.dumps(doc).encode(), secret


def types_for(kind: str) -> tuple[str, ...]:
    """Every message type over a PQC hop; over a QKD hop the key-carrying one, since
    messages without key material are sealed with ML-KEM alone (relay.hopkey)."""
    return ("ext_keys",) if kind == "qkd" else tuple(env.MESSAGE_TYPES)


def exchange_many(a: RelayNode, b: RelayNode, kind: str) -> tuple[list[bytes], list[bytes]]:
    """Seal MESSAGES at A, open each at B; return the envelopes and the canary secrets."""
    envelopes, secrets = [], []
    types = types_for(kind)
    for i in range(MESSAGES):
        body, secret = etsi_body(i)
        message_type = types[i % len(types)]
        sealed = a.client.seal(b.name, message_type, body, 1 + i % 7)
        assert sealed.kind == kind
        opened = b.client.open(a.name, message_type, sealed.envelope)
        assert (opened.body, opened.hop, opened.kind) == (body, 1 + i % 7, kind)
        envelopes.append(sealed.envelope)
        secrets.append(secret)
    return envelopes, secrets


def check_replays_and_record(a: RelayNode, b: RelayNode, envelopes: list[bytes],
                             kind: str) -> list[dict[str, Any]]:
    types = types_for(kind)
    for i, data in enumerate(envelopes):
        with pytest.raises(KmstnError) as err:
            b.client.open(a.name, types[i % len(types)], data)
        assert err.value.code is ErrorCode.UNKNOWN_SESSION, err.value
        assert "already used" in err.value.public
    record = [line for line in a.log_lines() if line["msg"] == "sealed"]
    sessions = [line["session"] for line in record]
    assert len(sessions) == MESSAGES
    assert len(set(sessions)) == MESSAGES, "a KEM session was used twice"
    assert sessions == [json.loads(e)["session"] for e in envelopes]
    return record


def check_no_secrets_logged(nodes: list[RelayNode], secrets: list[bytes]) -> None:
    text = "\n".join(n.proc.logs() for n in nodes)
    for secret in secrets:
        assert base64.b64encode(secret).decode() not in text
        assert secret.hex() not in text


def neighbour_peer_client(node: RelayNode, as_node: str, fed: FederationFiles,
                          pki: Pki) -> RelayPeerClient:
    """A RelayPeer client to ``node`` presenting ``as_node``'s certificate."""
    cert, key = pki.issue(as_node, ips=(fed.host_of(as_node),))
    config = load_node_config(fed.root / as_node / "node.toml")
    assert config.tls.cert == cert and config.tls.key == key
    return RelayPeerClient(peer_channel(config, NodeId(node.name)), timeout=20)


# -- PQC hop ------------------------------------------------------------------------------


@pytest.fixture
def pqc_pair(short_tmp: Path, pki: Pki) -> Iterator[tuple[FederationFiles, RelayNode,
                                                         RelayNode]]:
    fed = FederationFiles(short_tmp, pki)
    fed.kmstn("A", "127.0.0.41")
    fed.kmstn("B", "127.0.0.42")
    fed.kmstn("C", "127.0.0.43")
    fed.pqc("A", "B")
    fed.write()
    fed.node_file("C")  # a federation member that is not B's neighbour
    a = start_relay(fed, "A")
    try:
        b = start_relay(fed, "B")
    except BaseException:
        a.stop()
        raise
    try:
        yield fed, a, b
    finally:
        codes = (a.stop(), b.stop())
    assert codes == (0, 0), a.proc.logs() + b.proc.logs()


def test_thousand_messages_over_a_pqc_hop(pqc_pair: tuple[FederationFiles, RelayNode,
                                                          RelayNode]) -> None:
    _, a, b = pqc_pair
    envelopes, secrets = exchange_many(a, b, "pqc")
    record = check_replays_and_record(a, b, envelopes, "pqc")
    assert {line["kind"] for line in record} == {"pqc"}
    assert all(json.loads(e)["alg"] == env.ALG_PQC for e in envelopes)
    check_no_secrets_logged([a, b], secrets)
    # The pool was refilled in the background many times (size 16).
    errors = [line for line in a.log_lines() + b.log_lines() if line["level"] == "error"]
    assert not errors, [json.dumps(e) for e in errors]


def test_open_errors_through_grpc(pqc_pair: tuple[FederationFiles, RelayNode,
                                                  RelayNode]) -> None:
    _, a, b = pqc_pair
    body, _ = etsi_body(0)
    data = a.client.seal("B", "ext_keys", body, 1).envelope
    doc = json.loads(data)
    iv = bytearray(base64.b64decode(doc["iv"]))
    iv[0] ^= 0x80
    tampered = json.dumps({**doc, "iv": base64.b64encode(bytes(iv)).decode()}).encode()
    cases = [
        (("A", "ext_keys", b"not json"), ErrorCode.INVALID_ARGUMENT, "not a JSON object"),
        (("A", "void", data), ErrorCode.TAMPERED, "sealed for ext_keys"),
        (("C", "ext_keys", data), ErrorCode.UNKNOWN_NODE, "not a kmstn neighbour"),
        (("A", "ext_keys", tampered), ErrorCode.TAMPERED, "failed authentication"),
        (("A", "ext_keys", data), ErrorCode.UNKNOWN_SESSION, "already used"),
    ]
    for args, code, fragment in cases:
        with pytest.raises(KmstnError) as err:
            b.client.open(*args)
        assert err.value.code is code and fragment in err.value.public, err.value
    with pytest.raises(KmstnError) as err:
        a.client.seal("C", "ext_keys", body, 1)
    assert err.value.code is ErrorCode.UNKNOWN_NODE
    with pytest.raises(grpc.RpcError) as rpc_err:
        relay_pb2_grpc.RelayStub(a.channel).Seal(
            relay_pb2.SealRequest(next_hop_node_id="B", body=body, hop=1), timeout=5)
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_relay_peer_requires_a_neighbour_certificate(
        pqc_pair: tuple[FederationFiles, RelayNode, RelayNode], pki: Pki) -> None:
    fed, _, b = pqc_pair
    ok = neighbour_peer_client(b, "A", fed, pki).public_keys(3)
    assert len(ok) == 3 and all(len(k.public_key) == kem.PUBLIC_KEY_BYTES for k in ok)
    assert len({k.session for k in ok}) == 3 and ok[0].ttl_seconds == 120
    with pytest.raises(KmstnError) as err:
        neighbour_peer_client(b, "C", fed, pki).public_keys(1)
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    # No client certificate at all: the TLS handshake fails.
    node = b.config.topology.kmstns[NodeId("B")]
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_path.read_bytes())
    with grpc.secure_channel(f"{node.host}:{node.relay_port}", creds) as channel:
        with pytest.raises(KmstnError) as err:
            RelayPeerClient(channel, timeout=5).public_keys(1)
    assert err.value.code is ErrorCode.UNAVAILABLE


def test_unpipelined_exchange_with_a_real_receiver(
        pqc_pair: tuple[FederationFiles, RelayNode, RelayNode], pki: Pki) -> None:
    """The paper's explicit exchange: PublicKeys, Encapsulated, then an envelope
    without kem_ciphertext, sealed here as A (holding A's certificate)."""
    fed, _, b = pqc_pair
    peer = neighbour_peer_client(b, "A", fed, pki)
    (one_time,) = peer.public_keys(1)
    secret, ciphertext = kem.encapsulate(kem.load_public_key(one_time.public_key))
    peer.encapsulated(one_time.session, ciphertext)
    with pytest.raises(KmstnError) as err:  # the private key is already gone
        peer.encapsulated(one_time.session, ciphertext)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION
    header = env.Header(alg=env.ALG_PQC, session=one_time.session, src=NodeId("A"),
                        dst=NodeId("B"), hop=1, type="ext_keys")
    body, _ = etsi_body(1)
    data = env.seal(header, combine(secret, None), body, os.urandom(12))
    assert b.client.open("A", "ext_keys", data).body == body
    with pytest.raises(KmstnError) as err:
        b.client.open("A", "ext_keys", data)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION
    with pytest.raises(KmstnError) as err:
        peer.encapsulated(uuid.uuid4(), ciphertext)
    assert err.value.code is ErrorCode.UNKNOWN_SESSION


# -- QKD hop ------------------------------------------------------------------------------


def start_qkdsim(fed: FederationFiles, pki: Pki, link: QkdLink) -> ServiceProcess:
    from lab.qkdsim.config import sim_healthy, write_sim_config

    certs: dict[str, Issued] = {}
    for end in (link.alice, link.bob):
        assert end is not None
        cert, key = pki.issue(end.kme_id, ips=(end.host,))
        certs[end.kme_id] = Issued(cert, key)
    sim_file = write_sim_config(fed.root / "sim" / "sim.toml", topology=fed.topology_path,
                                link=link.id, ca=pki.ca_path,
                                alice=certs[link.alice.kme_id],  # type: ignore[union-attr]
                                bob=certs[link.bob.kme_id])  # type: ignore[union-attr]
    proc = ServiceProcess(["-m", "lab.qkdsim", "--config", str(sim_file)], fed.root / "sim",
                          "qkdsim")
    deadline = time.monotonic() + 30
    while not sim_healthy(link, pki.ca_path, certs):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"qkdsim did not start:\n{proc.logs()}")
        time.sleep(0.1)
    return proc


@pytest.fixture
def qkd_pair(short_tmp: Path, pki: Pki) -> Iterator[tuple[FederationFiles, RelayNode,
                                                         RelayNode]]:
    fed = FederationFiles(short_tmp, pki)
    fed.kmstn("A", "127.0.0.44")
    fed.kmstn("B", "127.0.0.45")
    fed.qkd("A", "B", rate=20_000_000.0)
    fed.write()
    config = load_node_config(fed.node_file("A"))
    (link,) = config.topology.qkd_links
    sim = start_qkdsim(fed, pki, link)
    nodes: list[RelayNode] = []
    try:
        nodes.append(start_relay(fed, "A"))
        nodes.append(start_relay(fed, "B"))
        yield fed, nodes[0], nodes[1]
    finally:
        codes = [n.stop() for n in nodes]
        sim.stop()
    assert codes == [0, 0], "\n".join(n.proc.logs() for n in nodes)


def test_thousand_messages_over_a_qkd_hop(qkd_pair: tuple[FederationFiles, RelayNode,
                                                          RelayNode]) -> None:
    _, a, b = qkd_pair
    envelopes, secrets = exchange_many(a, b, "qkd")
    record = check_replays_and_record(a, b, envelopes, "qkd")
    assert {line["kind"] for line in record} == {"qkd"}
    key_ids = [json.loads(e)["qkd_key_id"] for e in envelopes]
    assert len(set(key_ids)) == MESSAGES
    assert key_ids == [line["qkd_key_id"] for line in record]
    assert {json.loads(e)["sae"] for e in envelopes} == {"A"}
    check_no_secrets_logged([a, b], secrets)


def test_qkd_key_unknown_to_the_receivers_device(
        qkd_pair: tuple[FederationFiles, RelayNode, RelayNode], pki: Pki) -> None:
    fed, _, b = qkd_pair
    peer = neighbour_peer_client(b, "A", fed, pki)
    (one_time,) = peer.public_keys(1)
    kem_secret, ciphertext = kem.encapsulate(kem.load_public_key(one_time.public_key))
    header = env.Header(alg=env.ALG_QKD, session=one_time.session, src=NodeId("A"),
                        dst=NodeId("B"), hop=1, type="ext_keys", kem_ciphertext=ciphertext,
                        qkd_key_id=uuid.uuid4(), sae=SaeId("A"))
    data = env.seal(header, combine(kem_secret, SecretBytes(os.urandom(32))), b"{}",
                    os.urandom(12))
    with pytest.raises(KmstnError) as err:
        b.client.open("A", "ext_keys", data)
    assert err.value.code is ErrorCode.KEY_NOT_FOUND, err.value
    # A wrong device SAE is refused before the device is asked.
    (one_time,) = peer.public_keys(1)
    kem_secret, ciphertext = kem.encapsulate(kem.load_public_key(one_time.public_key))
    header = env.Header(alg=env.ALG_QKD, session=one_time.session, src=NodeId("A"),
                        dst=NodeId("B"), hop=1, type="ext_keys", kem_ciphertext=ciphertext,
                        qkd_key_id=uuid.uuid4(), sae=SaeId("B"))
    data = env.seal(header, combine(kem_secret, SecretBytes(os.urandom(32))), b"{}",
                    os.urandom(12))
    with pytest.raises(KmstnError) as err:
        b.client.open("A", "ext_keys", data)
    assert err.value.code is ErrorCode.TAMPERED and "not the QKD device of A" in err.value.public
