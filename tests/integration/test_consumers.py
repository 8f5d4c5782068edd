"""Issue 14 acceptance: the clients people already run, against a live federation.

The federation is the line of tests/line.py, W =QKD= X --PQC-- Y =QKD= Z:
master sae-w at W, slave sae-z at Z, three hops and two QKD islands apart.

- ``qkdsec doctor`` (PyPI qkdsec, a third-party ETSI 014 conformance probe),
  run unmodified as its own command, and once more with the one harness a
  federated KMS needs (named below, with the reason).
- A real consumer: OpenSSL's unmodified ``s_server`` and ``s_client`` protect
  traffic with TLS 1.3 and an external PSK that is a kmstn key, fetched the
  way PSK rotators fetch it (GET enc_keys, GET dec_keys); with different keys
  the handshake fails on both sides.
- ``kmstn sae rotate`` feeding both ends, retrying while the path is down.
- Status stays complete while the path is down.
- SKIP (draft-cisco-skip-02) with the PyPI ``skip-qkd`` client, unmodified.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import requests
from qkdsec.client import ETSI014Client
from qkdsec.client._types import KeysContainer
from qkdsec.doctor import ProbeStatus, run_all
from qkdsec.doctor.probes import probe_dec_keys_roundtrip

from tests.helpers import free_port, run_cli
from tests.line import HOSTS, PQC_LINK, Line, start_line

pytestmark = pytest.mark.integration

NOT_FOUND = "one or more keys specified are not found on KME"
# Every probe of qkdsec 0.3.0's doctor (qkdsec/doctor/probes.py, run_all).
PROBES = {"reachability", "status_fields", "enc_keys_get", "enc_keys_post", "enc_keys_caps",
          "extensions_accepted", "dec_keys_roundtrip", "error_contract_404",
          "error_contract_400", "latency"}
# dec_keys_roundtrip fetches, with the MASTER's certificate at the MASTER's KME,
# the key it just got, naming the slave in the path: a single-KME shortcut.
# ETSI 014 clause 5.3 has the slave call Get key with key IDs at its own KME,
# naming the master; a federated KMS must refuse the master (else any master
# could read a copy meant for a slave three hops away). It is the probe run
# through SlaveAtItsOwnKme below.
HARNESSED = "dec_keys_roundtrip"
# error_contract_404 wants HTTP 404 for an unknown key ID. ETSI 014 V1.1.1
# clause 5 defines 200/400/401/503 only, and clause 5.4 (spec note rule 4)
# prescribes 400 with the message "one or more keys specified are not found on
# KME"; kmstn answers that, so the probe WARNs (a warning, not a failure: the
# doctor's verdict stays CONFORMANT). Answering 404 would break the standard.
WARNS_BY_STANDARD = "error_contract_404"


@pytest.fixture(scope="module")
def line() -> Iterator[Line]:
    with start_line() as federation:
        yield federation


def session(line: Line, sae: str) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # the machine sets REQUESTS_CA_BUNDLE
    s.verify = line.ca
    s.cert = line.cert(sae)
    return s


def one_key(resp: requests.Response) -> tuple[str, bytes]:
    assert resp.status_code == 200, resp.text
    (key,) = resp.json()["keys"]
    return key["key_ID"], base64.b64decode(key["key"], validate=True)


def shared_key(line: Line) -> tuple[str, bytes, bytes]:
    """A key as an arnika-style PSK rotator gets it: GET enc_keys, then GET dec_keys.

    Returns the key ID, the master's copy and the slave's copy.
    """
    key_id, master_copy = one_key(session(line, "sae-w").get(
        line.url("W") + "/api/v1/keys/sae-z/enc_keys", params={"number": 1, "size": 256},
        timeout=30))
    got_id, slave_copy = one_key(session(line, "sae-z").get(
        line.url("Z") + "/api/v1/keys/sae-w/dec_keys", params={"key_ID": key_id}, timeout=30))
    assert got_id == key_id
    return key_id, master_copy, slave_copy


def test_the_key_path_is_three_hops_across_two_islands(line: Line) -> None:
    got = run_cli(["-m", "kme", "route", "--config", str(line.node_file("W")), "sae-z"])
    assert got.returncode == 0, got.stderr
    route = json.loads(got.stdout)
    assert route["path"] == ["W", "X", "Y", "Z"]
    assert [h["kind"] for h in route["hops"]] == ["qkd", "pqc", "qkd"]


# -- qkdsec doctor ------------------------------------------------------------------------


def _doctor_env() -> dict[str, str]:
    # No proxy may stand between the probe and 127.0.0.x.
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def test_qkdsec_doctor_unmodified(line: Line) -> None:
    """`qkdsec doctor` as a user runs it, as master sae-w at W for slave sae-z at Z.

    Every probe passes except the two named above: dec_keys_roundtrip fails
    because kmstn refuses the master's single-KME shortcut (the next test runs
    it through the harness), error_contract_404 warns because ETSI 014 says 400.
    """
    cert, key = line.cert("sae-w")
    doctor = Path(sys.executable).with_name("qkdsec")
    done = subprocess.run(
        [str(doctor), "doctor", line.url("W"), "--slave-sae-id", "sae-z", "--cert", cert,
         "--key", key, "--ca-cert", line.ca, "--format", "json", "--timeout", "60"],
        capture_output=True, text=True, timeout=300, env=_doctor_env(), check=False)
    report = json.loads(done.stdout)
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == PROBES, done.stderr
    for name in PROBES - {HARNESSED, WARNS_BY_STANDARD}:
        assert results[name]["status"] == "pass", results[name]
    refused = results[HARNESSED]
    assert refused["status"] == "fail" and f"HTTP 400: {NOT_FOUND}" in refused["summary"]
    warned = results[WARNS_BY_STANDARD]
    assert warned["status"] == "warn" and warned["details"] == {"http_status": 400}
    assert done.returncode == 1  # the doctor's verdict, from the refused shortcut alone


class SlaveAtItsOwnKme(ETSI014Client):
    """qkdsec's own client, changed in one method: dec_keys is called as ETSI 014
    clause 5.3 has it, by the slave, at the slave's KMSTN, naming the master.

    Everything else (status, enc_keys, the checks of every probe) is qkdsec's
    code, unmodified.
    """

    def __init__(self, base_url: str, *, slave: ETSI014Client, master_sae_id: str,
                 **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._slave = slave
        self._master_sae_id = master_sae_id

    def get_dec_keys_container(self, slave_sae_id: str, *, key_ids: list[str],
                               key_id_extensions: dict[str, dict[str, Any]] | None = None,
                               key_ids_extension: dict[str, Any] | None = None
                               ) -> KeysContainer:
        del slave_sae_id  # the path of dec_keys names the master (clause 5.3)
        return self._slave.get_dec_keys_container(
            self._master_sae_id, key_ids=key_ids, key_id_extensions=key_id_extensions,
            key_ids_extension=key_ids_extension)


def _qkdsec_client(line: Line, sae: str, node: str, **kwargs: Any) -> ETSI014Client:
    plain = requests.Session()
    plain.trust_env = False
    cls = SlaveAtItsOwnKme if kwargs else ETSI014Client
    return cls(line.url(node), client_cert=line.cert(sae), verify=line.ca, timeout=60,
               session=plain, **kwargs)


def test_qkdsec_doctor_harnessed_round_trip_passes(line: Line) -> None:
    """dec_keys_roundtrip through SlaveAtItsOwnKme: the slave three hops away gets
    the master's key, byte for byte; the whole battery run so is CONFORMANT."""
    slave = _qkdsec_client(line, "sae-z", "Z")
    harness = _qkdsec_client(line, "sae-w", "W", slave=slave, master_sae_id="sae-w")
    probe = probe_dec_keys_roundtrip(harness, "sae-z")
    assert probe.status is ProbeStatus.PASS, probe
    report = run_all(harness, "sae-z")
    results = {r.name: r for r in report.results}
    assert set(results) == PROBES
    for name in PROBES - {WARNS_BY_STANDARD}:
        assert results[name].status is ProbeStatus.PASS, results[name]
    # Through the harness too, the unknown key ID gets ETSI 014's 400.
    assert results[WARNS_BY_STANDARD].status is ProbeStatus.WARN
    assert results[WARNS_BY_STANDARD].details == {"http_status": 400}
    assert report.passed


# -- a real consumer: OpenSSL, TLS 1.3 with an external PSK ------------------------------


class _Lines:
    """Collects the lines of a process's output on a thread, so a test can wait for one."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0) -> bool:
        """True once a line holds ``text``; False if the output ends first."""
        with self._cond:
            self._cond.wait_for(lambda: self._done or any(text in s for s in self.lines),
                                timeout)
            return any(text in s for s in self.lines)

    def wait_closed(self, timeout: float = 60.0) -> str:
        with self._cond:
            self._cond.wait_for(lambda: self._done, timeout)
            return "\n".join(self.lines)


@dataclass
class Exchange:
    client_rc: int
    client_out: str
    server_rc: int
    server_out: str


def tls_psk_exchange(server_psk: bytes, client_psk: bytes, identity: str,
                     message: str) -> Exchange:
    """One TLS 1.3 connection between ``openssl s_server`` and ``openssl s_client``.

    The server has no certificate (-nocert): only the external PSK can
    authenticate the handshake (RFC 8446 section 4.2.11, psk_dhe_ke with
    X25519). In -rev mode it answers each line reversed, so data crosses both
    ways under the key.
    """
    openssl = shutil.which("openssl")
    assert openssl, "openssl is installed by deploy/debian-deps.sh"
    host = HOSTS["W"]
    port = free_port(host)
    server = subprocess.Popen(
        [openssl, "s_server", "-accept", f"{host}:{port}", "-nocert", "-tls1_3",
         "-psk", server_psk.hex(), "-psk_identity", identity, "-naccept", "1", "-rev"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client: subprocess.Popen[bytes] | None = None
    try:
        server_lines = _Lines(server.stdout)
        assert server_lines.wait_for("ACCEPT"), server_lines.wait_closed(5)
        client = subprocess.Popen(
            [openssl, "s_client", "-connect", f"{host}:{port}", "-tls1_3",
             "-psk", client_psk.hex(), "-psk_identity", identity],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        client_lines = _Lines(client.stdout)
        assert client.stdin is not None
        try:
            client.stdin.write(message.encode() + b"\n")
            client.stdin.flush()
        except BrokenPipeError:
            pass  # the client already gave up on the handshake
        client_lines.wait_for(message[::-1])
        with contextlib.suppress(BrokenPipeError):
            client.stdin.close()  # s_client closes the connection at the end of its input
        client_out = client_lines.wait_closed()
        client_rc = client.wait(60)
        server_out = server_lines.wait_closed()
        server_rc = server.wait(60)
        return Exchange(client_rc, client_out, server_rc, server_out)
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_openssl_tls13_psk_from_a_three_hop_key(line: Line) -> None:
    """Two SAEs three hops apart protect real traffic with the same kmstn key."""
    key_id, master_copy, slave_copy = shared_key(line)
    assert master_copy == slave_copy and len(master_copy) == 32
    message = f"hello from sae-w to sae-z under kmstn key {key_id}"
    done = tls_psk_exchange(slave_copy, master_copy, key_id, message)
    assert done.client_rc == 0, done.client_out
    assert message[::-1] in done.client_out.splitlines()  # the server read it and answered
    assert "TLSv1.3" in done.client_out
    assert "no peer certificate available" in done.client_out  # the PSK alone authenticated
    assert "CONNECTION ESTABLISHED" in done.server_out
    assert "Protocol version: TLSv1.3" in done.server_out
    assert done.server_rc == 0, done.server_out


def test_openssl_with_different_kmstn_keys_fails_on_both_sides(line: Line) -> None:
    """Each side holds a real kmstn key, but not the same one: no connection, no data."""
    first_id, master_first, _ = shared_key(line)
    _, _, slave_second = shared_key(line)
    assert master_first != slave_second
    message = "this must not get through"
    done = tls_psk_exchange(slave_second, master_first, first_id, message)
    assert done.client_rc != 0
    assert message[::-1] not in done.client_out
    assert "alert" in done.client_out  # the server's alert ends the client's handshake
    assert "binder does not verify" in done.server_out  # RFC 8446 4.2.11.2
    assert "CONNECTION ESTABLISHED" not in done.server_out


# -- kmstn sae rotate -----------------------------------------------------------------------


def _rotate(line: Line, sae: str, peer: str, role: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lab", "sae", "rotate", "--state", str(line.state),
            "--sae", sae, "--peer", peer, "--role", role, "--format", "hex",
            "--psk-file", str(out / f"{role}.psk"),
            "--exec", f"sh -c 'cat >> {out / (role + '.all')}'", *extra]


def test_sae_rotate_feeds_both_ends_the_same_keys(line: Line, tmp_path: Path) -> None:
    """Master's key IDs piped into the slave: three keys, identical at both ends."""
    master = subprocess.Popen(
        _rotate(line, "sae-w", "sae-z", "master", tmp_path, "--count", "3", "--interval",
                "0.2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    slave = subprocess.Popen(_rotate(line, "sae-z", "sae-w", "slave", tmp_path),
                             stdin=master.stdout, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert master.stdout is not None
    master.stdout.close()  # the slave holds the pipe now
    _, slave_err = slave.communicate(timeout=120)
    master_err = master.stderr.read() if master.stderr else b""
    assert master.wait(30) == 0, master_err
    assert slave.returncode == 0, slave_err
    master_keys = (tmp_path / "master.all").read_text().split()
    assert len(master_keys) == 3 and len(set(master_keys)) == 3
    assert (tmp_path / "slave.all").read_text().split() == master_keys
    assert (tmp_path / "master.psk").read_text() == (tmp_path / "slave.psk").read_text() \
        == master_keys[-1] + "\n"
    assert (tmp_path / "slave.psk").stat().st_mode & 0o777 == 0o600
    for key_hex in master_keys:  # key bytes never reach the log
        assert key_hex not in master_err.decode() + slave_err.decode()


def _link(line: Line, state: str) -> None:
    """Take PQC-X-Y down or up in W's routing, and wait until W's gateway acts on it.

    The gateway's route replica follows the routing service asynchronously, so
    the change is seen where it matters: enc_keys toward sae-z answers 503
    (down), or status counts keys again (up). The wait is bounded; nothing is
    timed.
    """
    got = run_cli(["-m", "kme", "link", "--config", str(line.node_file("W")), PQC_LINK, state])
    assert got.returncode == 0, got.stderr
    master = session(line, "sae-w")
    for _ in range(600):
        if state == "down":
            resp = master.get(line.url("W") + "/api/v1/keys/sae-z/enc_keys", timeout=30)
            if resp.status_code == 503:
                return
        else:
            resp = master.get(line.url("W") + "/api/v1/keys/sae-z/status", timeout=30)
            if resp.status_code == 200 and resp.json()["stored_key_count"] > 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"W's gateway did not follow {PQC_LINK} {state}: {resp.text}")


def test_sae_rotate_retries_503_until_the_path_is_back(line: Line, tmp_path: Path) -> None:
    """With the PQC hop down, enc_keys answers 503; rotate backs off and tries
    again, and gets its key once the link is up."""
    _link(line, "down")  # enc_keys answers 503 now
    try:
        master = subprocess.Popen(
            _rotate(line, "sae-w", "sae-z", "master", tmp_path, "--count", "1",
                    "--max-delay", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        errs = _Lines(master.stderr)
        assert errs.wait_for("trying again in"), errs.wait_closed(5)
        assert not (tmp_path / "master.psk").exists()
    finally:
        _link(line, "up")
    assert master.stdout is not None
    out = master.stdout.read()
    log = errs.wait_closed()
    master.wait(60)
    assert master.returncode == 0, log
    key_id = out.decode().strip()
    assert str(uuid.UUID(key_id)) == key_id
    assert "HTTP 503" in log and f"key {key_id} handed over" in log
    # The key it got is the slave's key too.
    got_id, slave_copy = one_key(session(line, "sae-z").get(
        line.url("Z") + "/api/v1/keys/sae-w/dec_keys", params={"key_ID": key_id}, timeout=30))
    assert got_id == key_id
    assert (tmp_path / "master.psk").read_text() == slave_copy.hex() + "\n"


def test_sae_rotate_stops_at_a_final_error(line: Line, tmp_path: Path) -> None:
    """A 400 (a key ID the slave's KMSTN does not hold) is not retried: exit 1 at once."""
    slave = subprocess.run(_rotate(line, "sae-z", "sae-w", "slave", tmp_path),
                           input=f"{uuid.uuid4()}\n".encode(), capture_output=True,
                           timeout=60, check=False)
    assert slave.returncode == 1
    assert f"HTTP 400: {NOT_FOUND}" in slave.stderr.decode()
    assert "trying again" not in slave.stderr.decode()
    assert not (tmp_path / "slave.psk").exists()


# -- status while the path is down -----------------------------------------------------------


def test_status_is_complete_while_the_path_is_down(line: Line) -> None:
    """ETSI 014 clause 4.1: all 11 fields, whatever the network does; stored_key_count
    is 0 while no key can travel, and never above max_key_count."""
    master = session(line, "sae-w")
    url = line.url("W") + "/api/v1/keys/sae-z/status"
    up = master.get(url, timeout=30).json()
    assert 0 < up["stored_key_count"] <= up["max_key_count"]
    _link(line, "down")
    try:
        resp = master.get(url, timeout=30)
    finally:
        _link(line, "up")
    assert resp.status_code == 200, resp.text
    down = resp.json()
    assert set(down) == set(up)
    assert down["stored_key_count"] == 0
    assert {k: v for k, v in down.items() if k != "stored_key_count"} == \
        {k: v for k, v in up.items() if k != "stored_key_count"}


# -- SKIP (draft-cisco-skip-02) with the PyPI skip-qkd client ---------------------------------


def skip(line: Line, sae: str, node: str) -> Any:
    """skip-qkd's client, mutual TLS as the SAE (it makes one request per connection)."""
    from skip_qkd import MTLSConfig, SkipQKDClient

    cert, key = line.cert(sae)
    return SkipQKDClient(line.url(node).removeprefix("https://"), sae,
                         mtls_config=MTLSConfig(ca_file=line.ca, cert_file=cert, key_file=key))


def test_skip_client_gets_one_key_at_both_ends_three_hops_apart(line: Line) -> None:
    caps = skip(line, "sae-w", "W").capabilities()
    assert caps["key"] is True and caps["localSystemID"] == "sae-w"
    assert "sae-z" in caps["remoteSystemID"] and "sae-w" not in caps["remoteSystemID"]
    new = skip(line, "sae-w", "W").request_key("sae-z", size=256)
    assert len(new["keyId"]) == 32 and len(bytes.fromhex(new["key"])) == 32
    got = skip(line, "sae-z", "Z").fetch_key_by_id(new["keyId"], "sae-w")
    assert got == new
    with pytest.raises(RuntimeError, match=" 404 "):  # taken once
        skip(line, "sae-z", "Z").fetch_key_by_id(new["keyId"], "sae-w")


def test_skip_and_etsi014_are_the_same_keys(line: Line) -> None:
    """A key asked for over SKIP is the kmstn key of that ID over ETSI 014 too."""
    new = skip(line, "sae-w", "W").request_key("sae-z")
    key_id, slave_copy = one_key(session(line, "sae-z").get(
        line.url("Z") + "/api/v1/keys/sae-w/dec_keys",
        params={"key_ID": str(uuid.UUID(hex=new["keyId"]))}, timeout=30))
    assert uuid.UUID(key_id).hex == new["keyId"] and slave_copy.hex() == new["key"]


def test_skip_errors_and_entropy(line: Line) -> None:
    new = skip(line, "sae-w", "W").request_key("sae-z")
    # The master cannot take the slave's copy, nor can an SAE at the wrong KMSTN.
    with pytest.raises(RuntimeError, match=" 404 "):
        skip(line, "sae-w", "W").fetch_key_by_id(new["keyId"], "sae-z")
    with pytest.raises(RuntimeError, match=" 401 "):
        skip(line, "sae-z", "W").fetch_key_by_id(new["keyId"], "sae-w")
    for bad in ({"remoteSystemID": "sae-z", "size": "17"}, {"remoteSystemID": "nobody"},
                {"remoteSystemID": "sae-w"}, {}, {"remoteSystemID": "sae-z", "number": "2"}):
        resp = session(line, "sae-w").get(line.url("W") + "/key", params=bad, timeout=30)
        assert resp.status_code == 400, (bad, resp.text)
        assert isinstance(resp.json()["message"], str)
    resp = session(line, "sae-z").get(line.url("Z") + "/key/not-a-key-id",
                                      params={"remoteSystemID": "sae-w"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["message"]
    # The slave still gets its key after all of that.
    assert skip(line, "sae-z", "Z").fetch_key_by_id(new["keyId"], "sae-w") == new
    assert len(bytes.fromhex(skip(line, "sae-w", "W").entropy()["randomStr"])) == 32
    got = skip(line, "sae-w", "W").entropy(minentropy=512)
    assert got["minentropy"] == 512 and len(bytes.fromhex(got["randomStr"])) == 64
