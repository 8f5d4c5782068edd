"""kme.qkd against the live emulator: keys, errors mapped to ErrorCode, threads, retries."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kme.config import QkdDeviceAccess, TlsFiles, load_node_config
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import KeyRequest
from kme.qkd import OverlayFields, QkdDevices
from kme.types import NodeId
from tests.contract.conftest import QkdSim
from tests.helpers import free_port, write_toml
from tests.integration.conftest import SimFactory

pytestmark = pytest.mark.integration


@pytest.fixture
def sim(qkd_sim: SimFactory) -> QkdSim:
    return qkd_sim(max_key_count=500, max_key_per_request=32,
                   sim={"rate_multiplier": 0.0, "initial_keys": 300})


def test_status_and_round_trip_both_ways(sim: QkdSim) -> None:
    a, b = sim.client("A"), sim.client("B")
    try:
        st = a.status()
        assert (st.source_kme_id, st.target_kme_id) == (sim.alice.kme_id, sim.bob.kme_id)
        assert (st.master_sae_id, st.slave_sae_id) == ("A", "B")
        assert st.stored_key_count == 300 and st.max_sae_id_count == 0
        keys = a.enc_keys(4, 512)
        assert [k.size_bits for k in keys] == [512] * 4
        assert b.status().stored_key_count == 300 - 8
        # Bob returns them in the order asked, identical.
        wanted = [k.key_id for k in reversed(keys)]
        got = b.dec_keys(wanted)
        assert [k.key_id for k in got] == wanted
        assert [k.material for k in got] == [k.material for k in reversed(keys)]
        # Default size is the device's key_size.
        back = b.enc_keys()
        assert back[0].size_bits == 256
        assert a.dec_keys([back[0].key_id])[0].material == back[0].material
    finally:
        a.close()
        b.close()


def test_device_errors_map_to_error_codes_with_private_causes(sim: QkdSim) -> None:
    a, b = sim.client("A"), sim.client("B")
    try:
        with pytest.raises(KmstnError) as err:
            b.dec_keys([uuid.uuid4()])
        assert err.value.code is ErrorCode.KEY_NOT_FOUND
        assert err.value.public == "one or more keys specified are not found on KME"
        assert err.value.cause and "HTTP 400" in err.value.cause

        with pytest.raises(KmstnError) as err:
            a.enc_keys(1, 17)
        assert err.value.code is ErrorCode.SIZE_NOT_MULTIPLE_OF_8
        assert err.value.public == "size shall be a multiple of 8"

        with pytest.raises(KmstnError) as err:
            a.enc_keys(33)  # above max_key_per_request
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        assert err.value.public == "the QKD device refused the request"
        assert "number must be" in (err.value.cause or "")

        # 300 keys of 256 bits: two requests of 32 x 1024 bits fit, a third does not.
        a.enc_keys(32, 1024)
        a.enc_keys(32, 1024)
        with pytest.raises(KmstnError) as err:
            a.enc_keys(32, 1024)
        assert err.value.code is ErrorCode.INSUFFICIENT_KEY
        assert err.value.public == "not enough QKD key material on the device"
        assert "HTTP 503" in (err.value.cause or "")
    finally:
        a.close()
        b.close()


def test_wrong_identity_is_unauthenticated_and_dec_keys_permission_denied(sim: QkdSim) -> None:
    # Node C's certificate toward Alice: the device answers 401.
    issued = sim.certs["C"]
    access = QkdDeviceAccess(sim.link.id, TlsFiles(sim.pki.ca_path, issued.cert, issued.key))
    from kme.qkd import QkdDeviceClient

    impostor = QkdDeviceClient(sim.link, NodeId("A"), access)
    try:
        for call in (impostor.status, impostor.enc_keys):
            with pytest.raises(KmstnError) as err:
                call()
            assert err.value.code is ErrorCode.UNAUTHENTICATED
            assert "C" not in err.value.public
        with pytest.raises(KmstnError) as err:
            impostor.dec_keys([uuid.uuid4()])
        assert err.value.code is ErrorCode.PERMISSION_DENIED
    finally:
        impostor.close()


def test_sanitized_request_reaches_the_device_without_overlay_fields(sim: QkdSim) -> None:
    a, b = sim.client("A"), sim.client("B")
    try:
        req = KeyRequest(number=2, size=256, additional_slave_sae_ids=("far-away",),
                         extension_mandatory=({"kmstn_route": "x"},),
                         extension_optional=({"kmstn_hint": 1}, {"abc_hint": 2}))
        keys, overlay = a.enc_keys_request(req)
        assert len(keys) == 2
        assert overlay == OverlayFields(("far-away",), ({"kmstn_route": "x"},),
                                        ({"kmstn_hint": 1},))
        assert len(b.dec_keys([k.key_id for k in keys])) == 2
        # Unsanitized, the device refuses the overlay field (paper IV-A.1).
        raw = sim.session("A").post(sim.url("alice", "/api/v1/keys/B/enc_keys"),
                                    json={"additional_slave_SAE_IDs": ["far-away"]}, timeout=5)
        assert raw.status_code == 400
        # A foreign mandatory extension is the device's to refuse.
        with pytest.raises(KmstnError) as err:
            a.enc_keys_request(KeyRequest(1, 256, extension_mandatory=({"abc_x": 1},)))
        assert err.value.code is ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION
    finally:
        a.close()
        b.close()


def test_one_client_many_threads(sim: QkdSim) -> None:
    a, b = sim.client("A"), sim.client("B")
    try:
        def one(_: int) -> bool:
            keys = a.enc_keys(2, 64)
            got = b.dec_keys([k.key_id for k in keys])
            return [k.material for k in got] == [k.material for k in keys]

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(one, range(80)))
        # Connections are reused: at most one per concurrent caller.
        assert 1 <= len(a._open) <= 8
    finally:
        a.close()
        b.close()
    with pytest.raises(KmstnError) as err:
        a.status()
    assert err.value.code is ErrorCode.UNAVAILABLE


def test_unreachable_device_is_unavailable(sim: QkdSim) -> None:
    from dataclasses import replace

    from kme.qkd import QkdDeviceClient

    dead = replace(sim.alice, port=free_port())
    link = replace(sim.link, alice=dead)
    issued = sim.certs["A"]
    access = QkdDeviceAccess(link.id, TlsFiles(sim.pki.ca_path, issued.cert, issued.key), 500)
    client = QkdDeviceClient(link, NodeId("A"), access)
    try:
        for call in (client.status, client.enc_keys):
            with pytest.raises(KmstnError) as err:
                call()
            assert err.value.code is ErrorCode.UNAVAILABLE
            assert err.value.public == "the QKD device is unreachable"
            assert str(dead.port) not in err.value.public
    finally:
        client.close()


class MuteDevice:
    """A TLS server with the device's certificate that reads requests and never answers."""

    def __init__(self, sim: QkdSim) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(sim.certs[sim.alice.kme_id].cert),
                                 str(sim.certs[sim.alice.kme_id].key))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self.listener.accept()[0]
            except TimeoutError:
                continue
            t = threading.Thread(target=self._read, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
            self._open.append(tls)
            data = tls.recv(65536)
            if data:
                self.requests.append(data.split(b"\r\n", 1)[0])
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(6)
        for s in self._open:
            s.close()
        self.listener.close()


def test_mute_device_times_out_and_only_reads_are_retried(sim: QkdSim) -> None:
    """The request reached the device, no answer came: TIMEOUT; enc/dec never repeated."""
    from dataclasses import replace

    from kme.qkd import QkdDeviceClient

    mute = MuteDevice(sim)
    link = replace(sim.link, alice=replace(sim.alice, port=mute.port))
    issued = sim.certs["A"]
    access = QkdDeviceAccess(link.id, TlsFiles(sim.pki.ca_path, issued.cert, issued.key), 300)
    client = QkdDeviceClient(link, NodeId("A"), access)
    try:
        for call, line, times in (
                (client.enc_keys, b"POST /api/v1/keys/B/enc_keys HTTP/1.1", 1),
                (lambda: client.dec_keys([uuid.uuid4()]),
                 b"POST /api/v1/keys/B/dec_keys HTTP/1.1", 1),
                (client.status, b"GET /api/v1/keys/B/status HTTP/1.1", 3)):
            before = len(mute.requests)
            with pytest.raises(KmstnError) as err:
                call()
            assert err.value.code is ErrorCode.TIMEOUT
            assert err.value.public == "the QKD device did not answer in time"
            deadline = time.monotonic() + 5
            while len(mute.requests) < before + times and time.monotonic() < deadline:
                time.sleep(0.01)
            assert mute.requests[before:] == [line] * times
    finally:
        client.close()
        mute.close()


def test_qkd_devices_from_a_node_file(sim: QkdSim, tmp_path: Path) -> None:
    cert, key = sim.certs["A"].cert, sim.certs["A"].key
    node_file = write_toml(tmp_path / "node.toml", {
        "node": "A", "topology": str(sim.topology_path), "data_dir": str(tmp_path / "data"),
        "tls": {"ca": str(sim.pki.ca_path), "cert": str(cert), "key": str(key)},
        "qkd_device": [{"link": sim.link.id, "timeout_ms": 3000}],
    })
    devices = QkdDevices(load_node_config(node_file))
    try:
        assert devices.links == (sim.link.id,)
        client = devices.toward(NodeId("B"))
        assert client is devices.for_link(sim.link.id)
        assert client is not None and client.access.timeout_ms == 3000
        assert devices.toward(NodeId("Z")) is None
        with pytest.raises(KmstnError) as err:
            devices.for_link("nope")
        assert err.value.code is ErrorCode.UNKNOWN_NODE
        assert client.status().slave_sae_id == "B"
        keys = client.enc_keys(1)
        peer = sim.client("B")
        try:
            assert peer.dec_keys([keys[0].key_id])[0].material == keys[0].material
        finally:
            peer.close()
    finally:
        devices.close()
