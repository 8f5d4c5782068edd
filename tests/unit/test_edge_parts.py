"""Pure parts of the edge: refusal answers, client certificates, names, counters, documents."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.app import client_request_id, openapi_document
from gateway.auth import check_client_certificate
from gateway.edge import EdgeCounters, authority_matcher
from gateway.errors import refusal_response
from kme.config import GatewaySettings
from kme.errors import KmstnError
from lab.pki import CertificateAuthority


def _answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_refusals_are_etsi_statuses_with_json_bodies() -> None:
    status, headers, body = _answer(refusal_response("etsi014", "too big", "bad", "POST", "r1"))
    assert status == 400 and json.loads(body) == {"message": "too big"}
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body) and "server" not in headers
    # ETSI 014 has no 408: a stall is a 400; a failure of ours a 503.
    assert _answer(refusal_response("etsi014", "slow", "timeout", "GET", "r"))[0] == 400
    assert _answer(refusal_response("etsi014", "oops", "server", "GET", "r"))[0] == 503
    status, _, body = _answer(refusal_response("etsi020", "slow", "timeout", "POST", "r2"))
    problem = json.loads(body)
    assert status == 408 and problem["status"] == 408 and "timeout" in problem["details"]
    status, _, body = _answer(refusal_response("etsi020", "bad", "bad", "POST", "r3"))
    assert status == 400 and json.loads(body)["type"].startswith("https://qkd.etsi.org/")
    # An answer to HEAD carries no content.
    assert _answer(refusal_response("etsi014", "no", "bad", "HEAD", "r"))[2] == b""


def _cert(ca: CertificateAuthority, *, is_ca: bool | None, usages: list[x509.ObjectIdentifier]
          | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sae-x")]))
         .issuer_name(ca.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    if is_ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    if usages is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return b.sign(ca._key, hashes.SHA256())


def test_client_certificates_must_be_end_entity_with_client_auth(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca", days=1)
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert check_client_certificate(_cert(ca, is_ca=False, usages=client)) == "sae-x"
    assert check_client_certificate(_cert(ca, is_ca=None, usages=client)) == "sae-x"
    with pytest.raises(KmstnError, match="end-entity"):
        check_client_certificate(_cert(ca, is_ca=True, usages=client))
    for usages in (None, [ExtendedKeyUsageOID.SERVER_AUTH]):
        with pytest.raises(KmstnError, match="clientAuth"):
            check_client_certificate(_cert(ca, is_ca=False, usages=usages))
    # The lab PKI issues what the gateways accept.
    issued = ca.issue("sae-y", tmp_path / "out")
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    assert check_client_certificate(cert) == "sae-y"


def test_client_request_ids_are_cut_and_stripped() -> None:
    assert client_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    assert client_request_id('evil"}\n{"level":"error') == "evillevel:error"
    assert client_request_id("a" * 500) == "a" * 64
    assert client_request_id(None) is None and client_request_id("\n\n") is None


def test_authority_matcher() -> None:
    ours = authority_matcher("127.0.0.11", 8014)
    assert ours("127.0.0.11:8014")
    assert not ours("127.0.0.11:8020") and not ours("127.0.0.12:8014") and not ours("x:y")
    assert authority_matcher("Node.Example", 443)("node.example")
    assert authority_matcher("::1", 8020)("[::1]:8020")


def test_counters_summarise_what_changed() -> None:
    c = EdgeCounters()
    c.add("refused_handshake_per_source", 3)
    assert c.since_last_summary() == {"refused_handshake_per_source": 3}
    assert c.since_last_summary() == {}
    c.add("refused_handshake_per_source")
    assert c.since_last_summary() == {"refused_handshake_per_source": 1}
    assert c.snapshot() == {"refused_handshake_per_source": 4}


def test_edge_defaults() -> None:
    g = GatewaySettings()
    assert g.handshake_timeout_ms <= 10_000
    assert g.header_timeout_ms <= 10_000 and g.body_timeout_ms <= 10_000


def test_served_documents_state_the_node_limits(tmp_path: Path) -> None:
    from kme.config import load_node_config
    from tests.federation import FederationFiles
    from tests.helpers import Pki

    files = FederationFiles(tmp_path, Pki(tmp_path / "pki"))
    files.kmstn("A")
    files.kmstn("B")
    files.qkd("A", "B", max_key_per_request=32, min_key_size=128, max_key_size=512,
              key_size=256)
    files.sae("sae-a", "A")
    files.write()
    config = load_node_config(files.node_file("A"))
    doc = yaml.safe_load(openapi_document("etsi014", config))
    req = doc["components"]["schemas"]["KeyRequest"]["properties"]
    assert (req["number"]["maximum"], req["size"]["minimum"], req["size"]["maximum"]) == (
        32, 128, 512)
    query = {p.get("name"): p for p in doc["paths"]["/api/v1/keys/{slave_SAE_ID}/enc_keys"]
             ["get"]["parameters"]}
    assert query["number"]["schema"]["maximum"] == 32
    assert doc["components"]["schemas"]["KeyRequest"]["additionalProperties"] is False
    # Without a node the file's own defaults are served.
    plain = yaml.safe_load(openapi_document("etsi014"))
    assert plain["components"]["schemas"]["KeyRequest"]["properties"]["number"]["maximum"] \
        == 128


def test_edge_settings_are_read_and_checked(tmp_path: Path) -> None:
    from gateway.edge import EdgeSettings
    from kme.config import ConfigError, load_node_config
    from tests.federation import FederationFiles
    from tests.helpers import Pki

    files = FederationFiles(tmp_path, Pki(tmp_path / "pki"))
    files.kmstn("A")
    files.write()
    config = load_node_config(files.node_file("A", gateway={
        "handshake_timeout_ms": 2000, "max_idle_per_source": 8}))
    edge = EdgeSettings.from_config(config.gateway)
    assert (edge.handshake_timeout, edge.max_idle_per_source) == (2.0, 8)
    assert edge.header_timeout == GatewaySettings().header_timeout_ms / 1000
    with pytest.raises(ConfigError, match=r"gateway\.body_timeout_ms"):
        load_node_config(files.node_file("A", gateway={"body_timeout_ms": 0}))
