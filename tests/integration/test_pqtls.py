"""The ETSI 020 transport: mutual TLS 1.3 only, X25519MLKEM768 (kme/pqtls.py, serve020)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cheroot import wsgi
from cheroot.ssl.pyopenssl import pyOpenSSLAdapter

from gateway.auth import caller_identity
from gateway.serve020 import _PeerGateway
from kme.config import TlsFiles
from kme.errors import ErrorCode, KmstnError
from kme.pqtls import PQ_GROUP, PeerHttpClient, server_context
from lab.pki import CertificateAuthority
from tests.helpers import Pki, free_port

pytestmark = pytest.mark.integration


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    seen = {k: environ.get(k) for k in ("kmstn.tls_group", "kmstn.tls_version")}
    body = json.dumps({"caller": caller_identity(environ), **seen}).encode()
    if environ["PATH_INFO"] == "/chunked":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body[:5], body[5:]]
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, int, TlsFiles]]:
    pki = Pki(tmp_path_factory.mktemp("pq"))
    cert, key = pki.issue("SRV")
    tls = TlsFiles(pki.ca_path, cert, key)
    port = free_port()
    srv = wsgi.Server(("127.0.0.1", port), _app, numthreads=4)
    srv.gateway = _PeerGateway
    adapter = pyOpenSSLAdapter(str(cert), str(key))
    adapter.context = server_context(tls)
    srv.ssl_adapter = adapter
    srv.prepare()
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    yield pki, port, tls
    srv.stop()


def client(pki: Pki, name: str = "CLI") -> PeerHttpClient:
    cert, key = pki.issue(name)
    return PeerHttpClient(TlsFiles(pki.ca_path, cert, key))


def test_hybrid_group_is_negotiated_and_identity_seen(server: tuple[Pki, int, TlsFiles]) -> None:
    pki, port, _ = server
    c = client(pki)
    resp = c.request("GET", f"https://127.0.0.1:{port}/", expected_peer="SRV")
    assert resp.status == 200
    assert resp.tls_group == PQ_GROUP
    seen = json.loads(resp.body)
    assert seen == {"caller": "CLI", "kmstn.tls_group": PQ_GROUP,
                    "kmstn.tls_version": "TLSv1.3"}
    # Chunked answers are decoded too (foreign KMSs may send them).
    assert json.loads(c.request("GET", f"https://127.0.0.1:{port}/chunked",
                                expected_peer="SRV").body) == seen
    c.close()


def test_connections_are_kept_alive(server: tuple[Pki, int, TlsFiles]) -> None:
    pki, port, _ = server
    c = client(pki)
    for _ in range(5):
        c.request("POST", f"https://127.0.0.1:{port}/", expected_peer="SRV", body=b"{}")
    pools = list(c._pools.values())
    assert len(pools) == 1 and len(pools[0]) == 1  # one connection served all five
    c.close()


def test_wrong_server_identity_is_refused(server: tuple[Pki, int, TlsFiles]) -> None:
    pki, port, _ = server
    with pytest.raises(KmstnError) as err:
        client(pki).request("GET", f"https://127.0.0.1:{port}/", expected_peer="SOMEONE-ELSE")
    assert err.value.code is ErrorCode.UNAUTHENTICATED


def _python_ssl(pki: Pki, port: int, version: ssl.TLSVersion, with_cert: bool) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = version
    ctx.load_verify_locations(str(pki.ca_path))
    if with_cert:
        cert, key = pki.issue("PY")
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := tls.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


def test_tls12_client_is_refused(server: tuple[Pki, int, TlsFiles]) -> None:
    pki, port, _ = server
    with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|protocol version"):
        _python_ssl(pki, port, ssl.TLSVersion.TLSv1_2, with_cert=True)


def test_classical_tls13_client_gets_a_classical_group(server: tuple[Pki, int, TlsFiles]) -> None:
    # Python's ssl (OpenSSL 3.0) has no ML-KEM: a plain ETSI 020 peer still
    # connects with X25519, and the 020 views decide whether that is allowed.
    pki, port, _ = server
    answer = _python_ssl(pki, port, ssl.TLSVersion.TLSv1_3, with_cert=True)
    assert '"kmstn.tls_group": "x25519"' in answer.lower()


def test_client_without_certificate_is_refused(server: tuple[Pki, int, TlsFiles]) -> None:
    pki, port, _ = server
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        answer = _python_ssl(pki, port, ssl.TLSVersion.TLSv1_3, with_cert=False)
        assert "200 OK" not in answer
        raise ssl.SSLError(answer)


def test_untrusted_client_certificate_is_refused(server: tuple[Pki, int, TlsFiles],
                                                 tmp_path: Path) -> None:
    pki, port, _ = server
    rogue = CertificateAuthority.create(tmp_path / "rogue")
    issued = rogue.issue("CLI", tmp_path)
    c = PeerHttpClient(TlsFiles(pki.ca_path, issued.cert, issued.key))
    with pytest.raises(KmstnError) as err:
        c.request("GET", f"https://127.0.0.1:{port}/", expected_peer="SRV")
    assert err.value.code is ErrorCode.UNAVAILABLE
    # And a standard client (requests) without any certificate gets nowhere either.
    with pytest.raises(requests.exceptions.RequestException):
        session = requests.Session()
        session.trust_env = False
        session.get(f"https://127.0.0.1:{port}/", verify=str(pki.ca_path), timeout=5)
