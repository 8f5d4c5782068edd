"""Issue 16: what a neighbour is allowed to ask for, by its position on the routes.

The test speaks plain ETSI 020 as the foreign KMS F on its site link to B
(trio: A =QKD= B --PQC-- C, F at B). F may bring keys only for initiators
whose route toward B ends with F, may void only keys that came from F, and a
resend of what F already delivered is answered as relayed, never stored or
handed out again. Every refusal is problem details and changes nothing in
B's keyvault.
"""

from __future__ import annotations

import base64
import os
import uuid

import grpc
import pytest

from keyvault.client import KeyVaultClient
from tests.contract.test_etsi020_gateway import EXT, VOID, Foreign, dec_keys, problem
from tests.sae import Sae, key_map
from tests.trio import Trio

pytestmark = pytest.mark.integration

NOT_FOUND = "one or more keys specified are not found on KME"


@pytest.fixture
def f(trio: Trio) -> Foreign:
    return Foreign(trio)


def _b_vault(trio: Trio) -> KeyVaultClient:
    return KeyVaultClient(grpc.insecure_channel(
        f"unix:{trio.root}/state/run/B/keyvault.sock"))


def _key() -> tuple[str, str]:
    return str(uuid.uuid4()), base64.b64encode(os.urandom(32)).decode()


def test_ext_keys_for_an_initiator_off_the_route_or_unknown_is_refused(trio: Trio,
                                                                      f: Foreign) -> None:
    """sae-a1 is served by A: its keys reach B from A, never from F (401). An initiator
    nobody serves is unknown (400). Neither request keeps anything at B."""
    vault = _b_vault(trio)
    before = vault.total_keys()
    key_id, value = _key()
    body = {"keys": [{"key_id": key_id, "value": value}], "initiator_sae_id": "sae-a1",
            "target_sae_ids": ["sae-b"]}
    problem(f.post(EXT, body), 401, EXT, "unauthorized")
    body["initiator_sae_id"] = "nobody"
    problem(f.post(EXT, body), 400, EXT, "target_sae_id_not_recognized")
    assert vault.total_keys() == before
    for master in ("sae-a1", "nobody"):
        got = dec_keys(trio, "sae-b", master, [key_id])
        assert got.status_code == 400 and got.json()["message"] == NOT_FOUND


def test_a_neighbour_may_void_only_keys_that_came_from_it(trio: Trio, f: Foreign) -> None:
    """A key B holds from A (a device-keys notice) cannot be voided by F: 401, and the
    key is still there for its slave. F's own key F may void."""
    from_a = key_map(Sae(trio.manifest, "sae-a1").enc_keys("sae-b", number=1))
    (a_id,) = from_a
    vault = _b_vault(trio)
    before = vault.total_keys()
    refused = f.post(VOID, {"key_ids": [a_id], "initiator_sae_id": "sae-a1",
                            "target_sae_ids": ["sae-b"]})
    problem(refused, 401, VOID, "unauthorized")
    # A void of all keys of that SAE set from F touches only F's keys: none here.
    every = f.post(VOID, {"key_ids": [], "initiator_sae_id": "sae-a1",
                          "target_sae_ids": ["sae-b"], "all_confirmation": True})
    assert every.status_code == 200 and every.json() == [], every.text
    assert vault.total_keys() == before
    assert key_map(dec_keys(trio, "sae-b", "sae-a1", [a_id])) == from_a

    key_id, value = _key()
    sent = f.post(EXT, {"keys": [{"key_id": key_id, "value": value}],
                        "initiator_sae_id": "sae-f", "target_sae_ids": ["sae-b"]})
    assert sent.status_code == 200 and sent.json()[0]["ack_status"] == "relayed", sent.text
    voided = f.post(VOID, {"key_ids": [key_id], "initiator_sae_id": "sae-f",
                           "target_sae_ids": ["sae-b"]})
    assert voided.status_code == 200, voided.text
    assert [a["ack_status"] for a in voided.json()] == ["voided"]


def test_an_identical_resend_is_relayed_and_a_real_conflict_is_refused(trio: Trio,
                                                                      f: Foreign) -> None:
    key_id, value = _key()
    body = {"keys": [{"key_id": key_id, "value": value}], "initiator_sae_id": "sae-f",
            "target_sae_ids": ["sae-b"]}
    first = f.post(EXT, body)
    assert first.status_code == 200 and first.json()[0]["ack_status"] == "relayed"
    got = dec_keys(trio, "sae-b", "sae-f", [key_id])
    assert got.status_code == 200 and got.json()["keys"][0]["key"] == value
    # The slave took it; the same message again (a retry whose answer was
    # lost) is success, and the key is not handed out a second time.
    again = f.post(EXT, body)
    assert again.status_code == 200, again.text
    assert [a["ack_status"] for a in again.json()] == ["relayed"]
    assert dec_keys(trio, "sae-b", "sae-f", [key_id]).status_code == 400
    # Another value under the same ID is a conflict: refused, nothing stored.
    body["keys"][0]["value"] = base64.b64encode(os.urandom(32)).decode()
    problem(f.post(EXT, body), 400, EXT, "key_id_conflict")
    assert dec_keys(trio, "sae-b", "sae-f", [key_id]).status_code == 400
