"""Issue 6 acceptance: keys across a QKD hop and a PQC hop with real processes.

A =QKD= B --PQC-- C (+ a foreign KMS F on a site link to B). Every service is
its own process (real swtpm, SQLCipher, mTLS, emulated QKD devices), started
by the real launcher (lab/federation.py).
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
import uuid
import warnings

import pytest
import requests
from etsi_qkd_014_client import QKD014Client

from kme.config import TlsFiles
from kme.errors import ErrorCode, KmstnError
from kme.pqtls import PQ_GROUP, PeerHttpClient
from tests.sae import Sae, key_map
from tests.trio import HOSTS, Trio

pytestmark = pytest.mark.integration

NOT_FOUND = "one or more keys specified are not found on KME"


def test_master_at_a_slave_at_c_over_two_hops(trio: Trio) -> None:
    master, slave = Sae(trio.manifest, "sae-a1"), Sae(trio.manifest, "sae-c1")
    keys = key_map(master.enc_keys("sae-c1", number=3, size=256))
    assert len(keys) == 3 and all(len(v) == 32 for v in keys.values())
    ids = list(keys)
    # POST form for two keys, GET form for the third: identical bytes.
    assert key_map(slave.dec_keys("sae-a1", ids[:2])) == {k: keys[k] for k in ids[:2]}
    got = slave.get("/api/v1/keys/sae-a1/dec_keys", key_ID=ids[2])
    assert key_map(got) == {ids[2]: keys[ids[2]]}
    # The same key again: 400 with the spec's message.
    again = slave.dec_keys("sae-a1", [ids[0]])
    assert again.status_code == 400 and again.json()["message"] == NOT_FOUND


def test_unnamed_sae_gets_401_and_wrong_kmstn_a_clear_error(trio: Trio) -> None:
    master = Sae(trio.manifest, "sae-a1")
    key_id = next(iter(key_map(master.enc_keys("sae-c1"))))
    intruder = Sae(trio.manifest, "sae-c2")  # served by C, but not named for the key
    resp = intruder.dec_keys("sae-a1", [key_id])
    assert resp.status_code == 401
    assert isinstance(resp.json()["message"], str)
    wrong_place = Sae(trio.manifest, "sae-c1").at("B", trio.manifest)
    resp = wrong_place.dec_keys("sae-a1", [key_id])
    assert resp.status_code == 401
    assert "served by C" in resp.json()["message"]
    # Neither failed call consumed the key.
    assert key_id in key_map(Sae(trio.manifest, "sae-c1").dec_keys("sae-a1", [key_id]))


def test_multicast_to_slaves_on_two_nodes(trio: Trio) -> None:
    master = Sae(trio.manifest, "sae-a1")
    keys = key_map(master.enc_keys("sae-b", number=2, additional_slave_SAE_IDs=["sae-c1"]))
    for sae in ("sae-b", "sae-c1"):
        assert key_map(Sae(trio.manifest, sae).dec_keys("sae-a1", list(keys))) == keys


def test_qkd_neighbour_and_same_node(trio: Trio) -> None:
    master = Sae(trio.manifest, "sae-a1")
    for slave in ("sae-b", "sae-a2"):
        keys = key_map(master.enc_keys(slave, number=2))
        assert key_map(Sae(trio.manifest, slave).dec_keys("sae-a1", list(keys))) == keys


def test_reverse_direction_from_c_to_a(trio: Trio) -> None:
    keys = key_map(Sae(trio.manifest, "sae-c1").enc_keys("sae-a2"))
    assert key_map(Sae(trio.manifest, "sae-a2").dec_keys("sae-c1", list(keys))) == keys


def test_independent_etsi014_client_across_three_nodes(trio: Trio) -> None:
    """nanoy42's etsi-qkd-014-client (PyPI) as master at A and slave at C."""
    def client(sae: str) -> QKD014Client:
        entry = next(s for s in trio.manifest["saes"] if s["id"] == sae)
        url = next(k["etsi014_url"] for k in trio.manifest["kmstns"]
                   if k["id"] == entry["kmstn"])
        # The client builds https://{kme_hostname}/... itself.
        return QKD014Client(url.removeprefix("https://"), entry["cert"], entry["key"], trio.ca)

    master, slave = client("sae-a1"), client("sae-c1")
    code, status = master.get_status("sae-c1")
    assert code == 200 and status.target_kme_id == "C"
    code, container = master.get_key("sae-c1", number=2, size=512)
    assert code == 200 and len(container.keys) == 2
    ids = [k.key_id for k in container.keys]
    code, got = slave.get_key_with_key_IDs("sae-a1", ids)
    assert code == 200
    assert [k.key for k in got.keys] == [k.key for k in container.keys]


def test_etsi020_listener_negotiates_the_hybrid_group(trio: Trio) -> None:
    certs = trio.root / "state" / "pki" / "certs"
    client = PeerHttpClient(TlsFiles(trio.root / "state" / "pki" / "ca.pem",
                                     certs / "A.pem", certs / "A.key"))
    try:
        resp = client.request("GET", trio.node("B")["etsi020_url"] + "/kmapi/versions", "B")
        assert resp.status == 200 and resp.tls_group == PQ_GROUP
        assert "v1" in json.loads(resp.body)["versions"]
    finally:
        client.close()
    # A TLS 1.2 client is refused at the handshake.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(trio.ca)
    ctx.load_cert_chain(str(certs / "A.pem"), str(certs / "A.key"))
    port = int(trio.node("B")["etsi020_url"].rsplit(":", 1)[1])
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"), \
            socket.create_connection((HOSTS["B"], port), 5) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOSTS["B"]):
        pass


def test_kmstn_peer_must_use_its_own_identity(trio: Trio) -> None:
    """Only neighbours may call (A is not C's neighbour); the server must be who we expect."""
    certs = trio.root / "state" / "pki" / "certs"
    client = PeerHttpClient(TlsFiles(trio.root / "state" / "pki" / "ca.pem",
                                     certs / "A.pem", certs / "A.key"))
    try:
        resp = client.request("GET", trio.node("C")["etsi020_url"] + "/kmapi/versions", "C")
        assert resp.status == 401
        assert resp.headers["content-type"].startswith("application/json")
        assert json.loads(resp.body)["type"].startswith("https://")
    finally:
        client.close()
    with pytest.raises(KmstnError) as err:
        PeerHttpClient(TlsFiles(trio.root / "state" / "pki" / "ca.pem", certs / "A.pem",
                                certs / "A.key")).request(
            "GET", trio.node("B")["etsi020_url"] + "/kmapi/versions", "C")
    assert err.value.code is ErrorCode.UNAUTHENTICATED


def test_foreign_kms_interop_both_directions(trio: Trio) -> None:
    """Plain ETSI 020 V1.1.1 with a foreign KMS F on a site link to B."""
    # Toward F: a master at A asks for a key shared with an SAE behind F. B
    # forwards it as plain 020 in asynchronous mode (F has no synchronous_mode)
    # and answers A only after F's ack arrived.
    keys = key_map(Sae(trio.manifest, "sae-a1").enc_keys("sae-f"))
    held = trio.foreign_session().get(trio.foreign_url + "/test/keys", timeout=10).json()
    for key_id, value in keys.items():
        assert base64.b64decode(held[key_id]["value"]) == value
        assert held[key_id]["targets"] == ["sae-f"]
    # From F: a plain client posts ext_keys to B for an SAE at A (2 hops on).
    key_id, value = str(uuid.uuid4()), "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA="
    s = trio.foreign_session()
    body = {"keys": [{"key_id": key_id, "value": value}], "initiator_sae_id": "sae-f",
            "target_sae_ids": ["sae-a2"],
            "ack_callback_url": trio.foreign_url + "/kmapi/v1/ext_keys/ack"}
    resp = s.post(trio.node("B")["etsi020_url"] + "/kmapi/v1/ext_keys", json=body, timeout=10)
    assert resp.status_code == 202 and resp.content == b""
    got = None
    for _ in range(100):
        got = Sae(trio.manifest, "sae-a2").dec_keys("sae-f", [key_id])
        if got.status_code == 200:
            break
        time.sleep(0.05)
    assert got is not None and got.status_code == 200
    assert got.json()["keys"][0]["key"] == value
    acks = s.get(trio.foreign_url + "/test/acks", timeout=10).json()
    mine = [a for a in acks if {"key_id": key_id} in a["key_id_container"]]
    assert [a["ack_status"] for a in mine] == ["relayed"]


def test_plain_020_from_a_kmstn_peer_is_refused(trio: Trio) -> None:
    """Between kmstn nodes every message is sealed; plain JSON from one is refused."""
    certs = trio.root / "state" / "pki" / "certs"
    client = PeerHttpClient(TlsFiles(trio.root / "state" / "pki" / "ca.pem",
                                     certs / "A.pem", certs / "A.key"))
    body = (b'{"keys":[{"key_id":"' + str(uuid.uuid4()).encode()
            + b'","value":"AAAA"}],"initiator_sae_id":"sae-a1","target_sae_ids":["sae-b"]}')
    try:
        resp = client.request("POST", trio.node("B")["etsi020_url"] + "/kmapi/v1/ext_keys",
                              "B", body, {"Content-Type": "application/json"})
    finally:
        client.close()
    assert resp.status == 400
    assert resp.headers["content-type"].startswith("application/json")
    assert json.loads(resp.body)["type"].startswith("https://")


def test_014_tls_versions(trio: Trio) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assert Sae(trio.manifest, "sae-a1", version).status("sae-c1").status_code == 200
    old = Sae(trio.manifest, "sae-a1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL 3 refuses TLS 1.1 at security level 1 on the client side too;
    # level 0 lets the client offer it, so the refusal below is the server's.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_verify_locations(trio.ca)
    host, port = old.base.split("//")[1].split(":")
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"), \
            socket.create_connection((host, int(port)), 5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host):
        pass
    # No client certificate: refused at the handshake.
    anon = requests.Session()
    anon.trust_env = False
    with pytest.raises(requests.exceptions.SSLError):
        anon.get(old.base + "/api/v1/keys/sae-c1/status", verify=trio.ca, timeout=10)


def test_no_key_bytes_in_any_log(trio: Trio) -> None:
    """Canary: keys delivered over every kind of path never appear in any process's log
    (gateways, flows, relays, keyvaults, routing, QKD emulators), in base64 or hex."""
    delivered: list[bytes] = []
    for master, slave in (("sae-a1", "sae-c1"), ("sae-a1", "sae-b"), ("sae-c2", "sae-a2"),
                          ("sae-a1", "sae-f")):
        keys = key_map(Sae(trio.manifest, master).enc_keys(slave, number=2))
        delivered += keys.values()
        if slave != "sae-f":
            got = key_map(Sae(trio.manifest, slave).dec_keys(master, list(keys)))
            assert got == keys
    logs = "".join(p.read_text(errors="replace")
                   for p in (trio.root / "state" / "logs").glob("*.log"))
    assert len(logs) > 10_000  # the processes did log their work
    for key in delivered:
        for form in (base64.b64encode(key).decode(), key.hex(), key.hex().upper()):
            assert form not in logs


def _process_memory(pid: int) -> bytes:
    """Every readable, private or anonymous mapping of a process (we run as its owner)."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            if "r" not in fields[1] or (path.startswith("/") and "(deleted)" not in line) \
                    or path in ("[vvar]", "[vsyscall]"):
                continue  # file-backed code and data hold no request data
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except OSError:
                continue
    return b"".join(chunks)


def test_no_plaintext_key_enters_a_transit_nodes_020_gateway(trio: Trio) -> None:
    """Issue 10: keys relayed A -> B -> C cross B's ETSI 020 listener only sealed.

    Executed check: after 40 keys went over the path, no key (raw or base64) is
    anywhere in the memory of B's gateway020 process, while a marker sent to
    that same listener in a request header is found there (the scan sees what
    arrives over the network). By construction: the 020 gateway imports
    nothing that can open an envelope (tests/unit/test_edge_imports.py).
    """
    master, slave = Sae(trio.manifest, "sae-a1"), Sae(trio.manifest, "sae-c1")
    keys: dict[str, bytes] = {}
    for _ in range(4):
        batch = key_map(master.enc_keys("sae-c1", number=10, size=256))
        assert key_map(slave.dec_keys("sae-a1", list(batch))) == batch
        keys.update(batch)
    marker = f"kmstn-memory-scan-{uuid.uuid4()}"
    s = requests.Session()
    s.trust_env = False
    s.get(trio.node("B")["etsi020_url"] + "/kmapi/versions", verify=trio.ca,
          cert=trio.foreign_cert, headers={"X-Marker": marker}, timeout=10)
    pids = json.loads((trio.root / "state" / "pids.json").read_text())
    memory = _process_memory(int(pids["B/gateway020"]["pid"]))
    assert marker.encode() in memory  # the scan reaches request data
    for key in keys.values():
        for form in (key, base64.b64encode(key)):
            assert form not in memory
