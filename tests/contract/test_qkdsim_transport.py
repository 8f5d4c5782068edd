"""ETSI GS QKD 014 clause 2 (transport and authentication) against the live emulator.

Each test names the line of the spec note's section 7 checklist it checks.
"""

from __future__ import annotations

import socket
import ssl
import warnings

import pytest
import requests

from lab.qkdsim.httpserver import MAX_HEADER
from tests.contract.conftest import QkdSim, assert_error

pytestmark = pytest.mark.integration


def _tls_version(sim: QkdSim, version: ssl.TLSVersion) -> str:
    """Handshake at exactly ``version`` (the client really offers it) and send one request."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(sim.pki.ca_path))
    ctx.load_cert_chain(str(sim.certs["A"].cert), str(sim.certs["A"].key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    # Security level 0 lets this client offer TLS 1.0/1.1, so a refusal can
    # only come from the server.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection((sim.alice.host, sim.alice.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=sim.alice.host) as tls:
        tls.sendall(b"GET /api/v1/keys/B/status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert tls.recv(12) == b"HTTP/1.1 200"
        return str(tls.version())


def test_tls_1_2_and_1_3_accepted(contract_sim: QkdSim) -> None:
    """Checklist: TLS 1.2 and 1.3 are accepted."""
    assert _tls_version(contract_sim, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert _tls_version(contract_sim, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_1_1_and_lower_refused(contract_sim: QkdSim, version: str) -> None:
    """Checklist: TLS 1.1 or lower is refused."""
    with pytest.raises((ssl.SSLError, ConnectionError)) as err:
        _tls_version(contract_sim, getattr(ssl.TLSVersion, version))
    # Not a client-side refusal to offer the version at all.
    assert "NO_PROTOCOLS_AVAILABLE" not in str(err.value)


def test_no_client_certificate_is_rejected(contract_sim: QkdSim) -> None:
    """Checklist: a TLS handshake without a client certificate is rejected."""
    s = contract_sim.session(None)
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        s.get(contract_sim.url("alice", "/api/v1/keys/B/status"), timeout=5)


def test_certificate_from_another_ca_is_rejected(contract_sim: QkdSim, tmp_path_factory:
                                                  pytest.TempPathFactory) -> None:
    """Clause 2: the KME checks the SAE certificate (here: not issued by its CA)."""
    from tests.helpers import Pki

    stranger = Pki(tmp_path_factory.mktemp("other-ca"))
    cert, key = stranger.issue("A")
    s = contract_sim.session(None)
    s.cert = (str(cert), str(key))
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        s.get(contract_sim.url("alice", "/api/v1/keys/B/status"), timeout=5)


@pytest.mark.parametrize("path", ["/api/v1/keys/B/status", "/api/v1/keys/B/enc_keys"])
def test_unauthorized_sae_gets_401_with_error_body(contract_sim: QkdSim, path: str) -> None:
    """Status codes table: 401 for an SAE that is not authorized; spec note 6: send a body."""
    # C has a valid certificate from the CA but is not Alice's SAE; B is
    # Bob's SAE, authorized at Bob only.
    for identity in ("C", "B"):
        resp = contract_sim.session(identity).get(contract_sim.url("alice", path), timeout=5)
        assert_error(resp, 401)


def test_sae_identity_comes_from_the_certificate(contract_sim: QkdSim) -> None:
    """Clause 2: the caller's SAE ID is the certificate's CN, never a header or the URL."""
    s = contract_sim.session("C")
    resp = s.get(contract_sim.url("alice", "/api/v1/keys/B/status"), timeout=5,
                 headers={"X-SAE-ID": "A", "From": "A"})
    assert_error(resp, 401)


def test_keep_alive_serves_many_requests_on_one_connection(contract_sim: QkdSim) -> None:
    """Clause 2 (HTTP/1.1): one TLS connection, several requests, pipelined too."""
    ctx = contract_sim.ssl_context("A")
    req = (b"GET /api/v1/keys/B/status HTTP/1.1\r\nHost: x\r\n\r\n" * 3
           + b"GET /api/v1/keys/B/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with socket.create_connection((contract_sim.alice.host, contract_sim.alice.port),
                                  timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=contract_sim.alice.host) as tls:
        tls.sendall(req)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 4
    assert data.count(b"Connection: close") == 1


def _raw(sim: QkdSim, request: bytes) -> bytes:
    ctx = sim.ssl_context("A")
    with socket.create_connection((sim.alice.host, sim.alice.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=sim.alice.host) as tls:
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data


def test_chunked_request_body_is_read(contract_sim: QkdSim) -> None:
    """HTTP/1.1 (RFC 9112 7.1): a chunked Key request is as good as a Content-Length one."""
    body = b'{"number": 2}'
    req = (b"POST /api/v1/keys/B/enc_keys HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
           + f"{len(body[:5]):x}\r\n".encode() + body[:5] + b"\r\n"
           + f"{len(body[5:]):x}\r\n".encode() + body[5:] + b"\r\n0\r\n\r\n")
    data = _raw(contract_sim, req)
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.count(b'"key_ID"') == 2


@pytest.mark.parametrize("request_bytes", [
    b"NONSENSE\r\n\r\n",
    b"GET /api/v1/keys/B/status HTTP/2.0\r\n\r\n",
    b"POST /api/v1/keys/B/enc_keys HTTP/1.1\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n{}",
    b"POST /api/v1/keys/B/enc_keys HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
    b"GET /api/v1/keys/B/status HTTP/1.1\r\nX: " + b"a" * (MAX_HEADER + 10) + b"\r\n\r\n",
])
def test_malformed_http_gets_400_and_close(contract_sim: QkdSim, request_bytes: bytes) -> None:
    """Status codes table: a bad request format is a 400 with an Error body, never a 500."""
    data = _raw(contract_sim, request_bytes)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Content-Type: application/json\r\n" in data
    assert b"Connection: close\r\n" in data
    assert b'{"message":"' in data


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/keys/B/nothing"),
    ("GET", "/api/v2/keys/B/status"),
    ("GET", "/"),
    ("POST", "/api/v1/keys/B/status"),
    ("DELETE", "/api/v1/keys/B/enc_keys"),
    ("PUT", "/api/v1/keys/A/dec_keys"),
])
def test_unknown_endpoint_or_method_is_400(contract_sim: QkdSim, method: str, path: str) -> None:
    """Status codes table: only 200/400/401/503 exist, so no 404 or 405."""
    resp = contract_sim.session("A").request(method, contract_sim.url("alice", path), timeout=5)
    assert_error(resp, 400)


def test_expect_100_continue_and_http_1_0(contract_sim: QkdSim) -> None:
    """HTTP/1.1 (RFC 9110 10.1.1): a client waiting for 100 Continue gets it; 1.0 closes."""
    ctx = contract_sim.ssl_context("A")
    body = b'{"number": 1}'
    with socket.create_connection((contract_sim.alice.host, contract_sim.alice.port),
                                  timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=contract_sim.alice.host) as tls:
        tls.sendall(b"POST /api/v1/keys/B/enc_keys HTTP/1.1\r\nHost: x\r\n"
                    b"Expect: 100-continue\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert tls.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        tls.sendall(body)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK") and data.count(b'"key_ID"') == 1
    data = _raw(contract_sim, b"GET /api/v1/keys/B/status HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close\r\n" in data
