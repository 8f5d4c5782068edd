"""Interop: an independent ETSI 014 client (nanoy42's etsi-qkd-014-client) drives the emulator.

The package is written by others, from the spec; it uses its own requests
calls and data classes. It must manage status, enc_keys (GET and POST) and
dec_keys against the emulator, and read our errors (it calls ``.json()`` on
every non-200 answer, 401 included).
"""

from __future__ import annotations

import base64

import pytest
from etsi_qkd_014_client import QKD014Client
from etsi_qkd_014_client.data import DataError, DataKeyContainer, DataStatus

from tests.contract.conftest import QkdSim

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clients(contract_sim: QkdSim) -> tuple[QKD014Client, QKD014Client, QKD014Client]:
    def client(identity: str, end: str) -> QKD014Client:
        device = contract_sim.alice if end == "alice" else contract_sim.bob
        return QKD014Client(f"{device.host}:{device.port}",
                            str(contract_sim.certs[identity].cert),
                            str(contract_sim.certs[identity].key),
                            str(contract_sim.pki.ca_path))

    return client("A", "alice"), client("B", "bob"), client("C", "alice")


def test_status(contract_sim: QkdSim, clients: tuple[QKD014Client, ...]) -> None:
    master = clients[0]
    code, status = master.get_status("B")
    assert code == 200 and isinstance(status, DataStatus)
    assert (status.source_kme_id, status.target_kme_id) == (contract_sim.alice.kme_id,
                                                            contract_sim.bob.kme_id)
    assert (status.master_sae_id, status.slave_sae_id) == ("A", "B")
    assert status.key_size == 256 and status.max_sae_id_count == 0
    assert status.max_key_count == 1000 and status.max_key_per_request == 64


def test_enc_keys_then_dec_keys(clients: tuple[QKD014Client, ...]) -> None:
    master, slave, _ = clients
    code, simple = master.get_key("B")  # no parameters: the GET form
    assert code == 200 and isinstance(simple, DataKeyContainer)
    assert len(simple.keys) == 1 and len(base64.b64decode(simple.keys[0].key)) == 32
    code, many = master.get_key("B", number=3, size=512)  # the POST form
    assert code == 200 and isinstance(many, DataKeyContainer)
    assert [len(base64.b64decode(k.key)) for k in many.keys] == [64, 64, 64]

    issued = {k.key_id: k.key for k in simple.keys + many.keys}
    code, got = slave.get_key_with_key_IDs("A", list(issued))
    assert code == 200 and isinstance(got, DataKeyContainer)
    assert {k.key_id: k.key for k in got.keys} == issued

    code, again = slave.get_key_with_key_IDs("A", list(issued)[:1])
    assert code == 400 and isinstance(again, DataError)
    assert again.message == "one or more keys specified are not found on KME"


def test_errors_are_readable(clients: tuple[QKD014Client, ...]) -> None:
    master, _, stranger = clients
    code, err = master.get_key("B", size=17)
    assert code == 400 and isinstance(err, DataError)
    assert err.message == "size shall be a multiple of 8"
    # This client sends extensions as a plain object; the emulator accepts that form.
    code, err = master.get_key("B", extension_mandatory={"abc_route": "x"})
    assert code == 400 and isinstance(err, DataError)
    assert err.message == "not all extension_mandatory parameters are supported"
    code, ok = master.get_key("B", number=2, extension_optional={"abc_hint": 1})
    assert code == 200 and isinstance(ok, DataKeyContainer) and len(ok.keys) == 2
    code, err = stranger.get_status("B")
    assert code == 401 and isinstance(err, DataError) and err.message
