"""ETSI GS QKD 014 V1.1.1 conformance of kmstn's northbound gateway (spec note section 7).

Each test names the checklist line it checks. Every response is validated
against the OpenAPI document the gateway serves (gateway/openapi/etsi014.yaml).
The federation is live (tests/trio.py): master sae-a1 at A; sae-c1 and
sae-c2 at C (two hops away); sae-b at B (QKD neighbour); sae-e at E, whose
QKD link to A starts with 5 keys and generates none.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
import requests

from tests.contract.openapi import check_response
from tests.sae import Sae
from tests.trio import EMPTY_LINK_KEYS, Trio

pytestmark = pytest.mark.integration

STATUS = "/api/v1/keys/{slave_SAE_ID}/status"
ENC = "/api/v1/keys/{slave_SAE_ID}/enc_keys"
DEC = "/api/v1/keys/{master_SAE_ID}/dec_keys"
NOT_FOUND = "one or more keys specified are not found on KME"


def ok(resp: requests.Response, path: str, method: str = "POST") -> Any:
    assert resp.status_code == 200, resp.text
    return check_response("etsi014", method, path, resp)


def error(resp: requests.Response, status: int, path: str, method: str = "POST") -> str:
    """Checklist: every 400/503 is application/json with a string message."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")
    body = check_response("etsi014", method, path, resp)
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"])


def keys_of(body: Any) -> dict[str, bytes]:
    return {k["key_ID"]: base64.b64decode(k["key"], validate=True) for k in body["keys"]}


@pytest.fixture
def master(trio: Trio) -> Sae:
    return Sae(trio.manifest, "sae-a1")


@pytest.fixture
def slave(trio: Trio) -> Sae:
    return Sae(trio.manifest, "sae-c1")


def test_status_has_all_fields_and_identities(master: Sae) -> None:
    """GET status -> 200 with all 11 fields; master_SAE_ID from the certificate."""
    body = ok(master.status("sae-c1"), STATUS, "GET")
    assert set(body) == {"source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID",
                         "key_size", "stored_key_count", "max_key_count",
                         "max_key_per_request", "max_key_size", "min_key_size",
                         "max_SAE_ID_count"}
    assert (body["source_KME_ID"], body["target_KME_ID"]) == ("A", "C")
    assert (body["master_SAE_ID"], body["slave_SAE_ID"]) == ("sae-a1", "sae-c1")
    assert body["max_SAE_ID_count"] > 0  # multicast is offered
    assert body["min_key_size"] <= body["key_size"] <= body["max_key_size"]


def test_get_enc_keys_defaults(master: Sae) -> None:
    """GET enc_keys with no query -> 1 key of key_size bits; POST {} likewise."""
    key_size = master.status("sae-c1").json()["key_size"]
    for resp in (master.get("/api/v1/keys/sae-c1/enc_keys"),
                 master.post("/api/v1/keys/sae-c1/enc_keys", {}),
                 master.post("/api/v1/keys/sae-c1/enc_keys", raw=b"")):
        keys = keys_of(ok(resp, ENC, resp.request.method or "POST"))
        assert len(keys) == 1
        assert len(next(iter(keys.values()))) * 8 == key_size


def test_number_and_size(master: Sae) -> None:
    """number=5 (GET and POST) -> 5 keys; number=1&size=1024 -> 128 bytes each."""
    assert len(keys_of(ok(master.get("/api/v1/keys/sae-c1/enc_keys", number=5), ENC, "GET"))) == 5
    assert len(keys_of(ok(master.enc_keys("sae-c1", number=5), ENC))) == 5
    keys = keys_of(ok(master.get("/api/v1/keys/sae-c1/enc_keys", number=1, size=1024), ENC,
                      "GET"))
    assert [len(v) for v in keys.values()] == [128]


def test_key_ids_are_unique_uuids_and_keys_base64(master: Sae) -> None:
    """Every key_ID is a UUID, unique across calls; every key is standard base64;
    a key given to one master is never returned by a later enc_keys."""
    seen_ids: set[str] = set()
    seen_keys: set[bytes] = set()
    for _ in range(5):
        for key_id, value in keys_of(ok(master.enc_keys("sae-b", number=10), ENC)).items():
            assert str(uuid.UUID(key_id)) == key_id
            assert key_id not in seen_ids and value not in seen_keys
            seen_ids.add(key_id)
            seen_keys.add(value)


@pytest.mark.parametrize(("query", "body"), [
    ({"number": "0"}, {"number": 0}),
    ({"number": "-8"}, {"number": -8}),
    ({"number": "abc"}, {"number": "abc"}),
    ({"size": "0"}, {"size": 0}),
    ({"size": "-8"}, {"size": -8}),
    ({"size": "abc"}, {"size": "abc"}),
])
def test_bad_number_and_size(master: Sae, query: dict[str, str], body: dict[str, Any]) -> None:
    """number=0/-8/abc and size=0/-8/abc, GET and POST -> 400 with an Error body."""
    error(master.get("/api/v1/keys/sae-c1/enc_keys", **query), 400, ENC, "GET")
    error(master.enc_keys("sae-c1", **body), 400, ENC)


def test_size_multiple_of_8_and_limits(master: Sae) -> None:
    """size=17 -> 400 'size shall be a multiple of 8'; size or number out of limits -> 400."""
    status = master.status("sae-c1").json()
    assert error(master.enc_keys("sae-c1", size=17), 400, ENC) == "size shall be a multiple of 8"
    assert error(master.get("/api/v1/keys/sae-c1/enc_keys", size=17), 400, ENC, "GET") == \
        "size shall be a multiple of 8"
    error(master.enc_keys("sae-c1", size=status["max_key_size"] + 8), 400, ENC)
    assert status["min_key_size"] > 8
    error(master.enc_keys("sae-c1", size=status["min_key_size"] - 8), 400, ENC)
    error(master.enc_keys("sae-c1", number=status["max_key_per_request"] + 1), 400, ENC)


def test_additional_slaves_rules(master: Sae) -> None:
    """[] -> 400; duplicate, master or path slave -> 400; more than max_SAE_ID_count -> 400;
    path slave equal to the caller -> 400."""
    error(master.enc_keys("sae-c1", additional_slave_SAE_IDs=[]), 400, ENC)
    for extra in (["sae-b", "sae-b"], ["sae-a1"], ["sae-c1"]):
        error(master.enc_keys("sae-c1", additional_slave_SAE_IDs=extra), 400, ENC)
    limit = master.status("sae-c1").json()["max_SAE_ID_count"]
    too_many = [f"x{i}" for i in range(limit + 1)]
    error(master.enc_keys("sae-c1", additional_slave_SAE_IDs=too_many), 400, ENC)
    error(master.enc_keys("sae-a1"), 400, ENC)
    error(master.get("/api/v1/keys/sae-a1/status"), 400, STATUS, "GET")


def test_extensions(master: Sae) -> None:
    """Unsupported extension_mandatory -> 400 with the spec message; unknown
    extension_optional -> 200 (ignored)."""
    msg = error(master.enc_keys("sae-c1", extension_mandatory=[{"abc_route_type": "direct"}]),
                400, ENC)
    assert msg == "not all extension_mandatory parameters are supported"
    ok(master.enc_keys("sae-c1", extension_optional=[{"abc_max_age": 30}]), ENC)
    ok(master.enc_keys("sae-c1", extension_optional={"abc_max_age": 30}), ENC)


def test_round_trips_post_and_get(master: Sae, slave: Sae) -> None:
    """Round trip POST and GET: the slave gets identical keys, once."""
    keys = keys_of(ok(master.enc_keys("sae-c1", number=2), ENC))
    first, second = list(keys)
    assert keys_of(ok(slave.dec_keys("sae-a1", [first]), DEC)) == {first: keys[first]}
    got = slave.get("/api/v1/keys/sae-a1/dec_keys", key_ID=second)
    assert keys_of(ok(got, DEC, "GET")) == {second: keys[second]}
    # The same key_ID again -> 400 with the spec's message.
    assert error(slave.dec_keys("sae-a1", [first]), 400, DEC) == NOT_FOUND
    assert error(slave.get("/api/v1/keys/sae-a1/dec_keys", key_ID=second), 400, DEC,
                 "GET") == NOT_FOUND


def test_unknown_and_malformed_key_ids(slave: Sae) -> None:
    """A never-issued UUID -> 400 with the spec message; a non-UUID (GET and POST) -> 400."""
    assert error(slave.dec_keys("sae-a1", [str(uuid.uuid4())]), 400, DEC) == NOT_FOUND
    error(slave.dec_keys("sae-a1", ["non-uuid"]), 400, DEC)
    error(slave.get("/api/v1/keys/sae-a1/dec_keys", key_ID="non-uuid"), 400, DEC, "GET")
    error(slave.post("/api/v1/keys/sae-a1/dec_keys", {"key_IDs": []}), 400, DEC)
    error(slave.post("/api/v1/keys/sae-a1/dec_keys", raw=b"{not json"), 400, DEC)


def test_third_sae_gets_401_and_nothing_is_consumed(trio: Trio, master: Sae,
                                                    slave: Sae) -> None:
    """dec_keys by a third SAE -> 401; the real slave still gets the key afterwards;
    one valid plus one unknown ID -> 400 and the valid key is still retrievable."""
    keys = keys_of(ok(master.enc_keys("sae-c1"), ENC))
    key_id = next(iter(keys))
    error(Sae(trio.manifest, "sae-c2").dec_keys("sae-a1", [key_id]), 401, DEC)
    assert error(slave.dec_keys("sae-a1", [key_id, str(uuid.uuid4())]), 400, DEC) == NOT_FOUND
    assert keys_of(ok(slave.dec_keys("sae-a1", [key_id]), DEC)) == keys


def test_multicast_slave_gets_identical_bytes(trio: Trio, master: Sae) -> None:
    """Keys issued with additional_slave_SAE_IDs [C] -> slave C gets identical bytes."""
    keys = keys_of(ok(master.enc_keys("sae-b", additional_slave_SAE_IDs=["sae-c2"]), ENC))
    for sae in ("sae-b", "sae-c2"):
        assert keys_of(ok(Sae(trio.manifest, sae).dec_keys("sae-a1", list(keys)), DEC)) == keys


def test_stored_count_drops_and_too_few_keys_is_503(trio: Trio, master: Sae) -> None:
    """stored_key_count drops by number after enc_keys; more keys than stored -> 503.

    A-E is a QKD link that starts with 5 keys and generates none, and E is A's
    QKD neighbour: the keys come straight from the device (no hop key spent).
    """
    before = ok(master.status("sae-e"), STATUS, "GET")["stored_key_count"]
    assert before == EMPTY_LINK_KEYS
    keys = keys_of(ok(master.enc_keys("sae-e", number=2), ENC))
    assert ok(master.status("sae-e"), STATUS, "GET")["stored_key_count"] == before - 2
    assert keys_of(ok(Sae(trio.manifest, "sae-e").dec_keys("sae-a1", list(keys)), DEC)) == keys
    error(master.enc_keys("sae-e", number=before - 1), 503, ENC)  # one more than stored
    assert ok(master.status("sae-e"), STATUS, "GET")["stored_key_count"] == before - 2


def test_unknown_endpoint_and_slave(master: Sae) -> None:
    """Unknown SAE, path or method: an ETSI Error body, never a 500."""
    error(master.status("nobody"), 400, STATUS, "GET")
    error(master.enc_keys("nobody"), 400, ENC)
    resp = master.get("/api/v1/keys/sae-c1/nothing")
    assert resp.status_code == 400 and "message" in resp.json()
    resp = master.session.delete(master.base + "/api/v1/keys/sae-c1/enc_keys", timeout=10)
    assert resp.status_code == 400 and "message" in resp.json()


def test_openapi_document_is_served(master: Sae) -> None:
    resp = master.get("/openapi.yaml")
    assert resp.status_code == 200 and b"openapi: 3.1.0" in resp.content
