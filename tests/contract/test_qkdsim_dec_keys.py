"""ETSI GS QKD 014 clause 5.3 (Get key with key IDs), 4.4 (Key IDs), 5.4 (not found).

Against the live emulator: the master is Alice's SAE "A", the slave is Bob's
SAE "B"; dec_keys is called at Bob with the *master* in the path. Each test
names the checklist line (spec note section 7) it checks.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from kme import etsi014
from tests.contract.conftest import QkdSim, assert_error

pytestmark = pytest.mark.integration

NOT_FOUND = "one or more keys specified are not found on KME"
DEC = "/api/v1/keys/A/dec_keys"


def _issue(sim: QkdSim, number: int = 1, size: int | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"number": number}
    if size is not None:
        body["size"] = size
    resp = sim.session("A").post(sim.url("alice", "/api/v1/keys/B/enc_keys"), json=body,
                                 timeout=5)
    assert resp.status_code == 200, resp.text
    keys: list[dict[str, Any]] = resp.json()["keys"]
    return keys


def _dec_post(sim: QkdSim, ids: list[str], identity: str = "B",
              path: str = DEC) -> requests.Response:
    return sim.session(identity).post(sim.url("bob", path),
                                      json={"key_IDs": [{"key_ID": i} for i in ids]}, timeout=5)


def _dec_get(sim: QkdSim, key_id: str, identity: str = "B") -> requests.Response:
    return sim.session(identity).get(sim.url("bob", f"{DEC}?key_ID={key_id}"), timeout=5)


def _values(resp: requests.Response) -> dict[str, str]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    return {k["key_ID"]: k["key"] for k in resp.json()["keys"]}


def test_round_trip_post(contract_sim: QkdSim) -> None:
    """Checklist: the master's enc_keys IDs POSTed by the slave (path = master) -> same keys."""
    keys = _issue(contract_sim, 3, 512)
    got = _values(_dec_post(contract_sim, [k["key_ID"] for k in keys]))
    assert got == {k["key_ID"]: k["key"] for k in keys}


def test_round_trip_get(contract_sim: QkdSim) -> None:
    """Checklist: dec_keys?key_ID=<id> by the slave -> 200 with the identical key."""
    key = _issue(contract_sim)[0]
    assert _values(_dec_get(contract_sim, key["key_ID"])) == {key["key_ID"]: key["key"]}


def test_round_trip_the_other_way(contract_sim: QkdSim) -> None:
    """Bob's master keys are Alice's slave keys: the ends are symmetric."""
    resp = contract_sim.session("B").post(contract_sim.url("bob", "/api/v1/keys/A/enc_keys"),
                                          json={"number": 2}, timeout=5)
    keys = {k["key_ID"]: k["key"] for k in resp.json()["keys"]}
    got = contract_sim.session("A").post(
        contract_sim.url("alice", "/api/v1/keys/B/dec_keys"),
        json={"key_IDs": [{"key_ID": i} for i in keys]}, timeout=5)
    assert _values(got) == keys
    # Keys issued at Bob never wait at Bob.
    assert_error(_dec_post(contract_sim, list(keys)), 400, NOT_FOUND)


def test_second_fetch_is_400_not_found(contract_sim: QkdSim) -> None:
    """Checklist: the same key_ID fetched a second time by the same slave -> 400, spec message."""
    key = _issue(contract_sim)[0]
    _values(_dec_get(contract_sim, key["key_ID"]))
    assert_error(_dec_get(contract_sim, key["key_ID"]), 400, NOT_FOUND)
    assert_error(_dec_post(contract_sim, [key["key_ID"]]), 400, NOT_FOUND)


def test_never_issued_uuid_is_400_not_found(contract_sim: QkdSim) -> None:
    """Checklist: dec_keys with a random (never issued) UUID -> 400 with the same message."""
    assert_error(_dec_get(contract_sim, str(uuid.uuid4())), 400, NOT_FOUND)
    assert_error(_dec_post(contract_sim, [str(uuid.uuid4())]), 400, NOT_FOUND)


@pytest.mark.parametrize("bad", ["non-uuid", "", "{12345678-1234-1234-1234-123456789012}",
                                 "1234567812341234123412345678901"])
def test_non_uuid_key_id_is_400(contract_sim: QkdSim, bad: str) -> None:
    """Checklist: dec_keys with key_ID = non-uuid (GET and POST) -> 400 with an Error body."""
    assert_error(_dec_get(contract_sim, bad), 400)
    assert_error(_dec_post(contract_sim, [bad]), 400)


def test_third_sae_gets_401_and_the_key_survives(contract_sim: QkdSim) -> None:
    """Checklist: dec_keys by a third SAE that is not a slave of that key -> 401;
    the key is still retrievable by the real slave afterwards (rec)."""
    key = _issue(contract_sim)[0]
    resp = _dec_post(contract_sim, [key["key_ID"]], identity="C")
    assert_error(resp, 401)
    resp = _dec_get(contract_sim, key["key_ID"], identity="A")  # the master at the wrong end
    assert_error(resp, 401)
    assert _values(_dec_get(contract_sim, key["key_ID"])) == {key["key_ID"]: key["key"]}


def test_one_unknown_id_fails_all_and_consumes_nothing(contract_sim: QkdSim) -> None:
    """Checklist: one valid and one unknown ID -> 400; the valid key is still retrievable (rec)."""
    key = _issue(contract_sim)[0]
    assert_error(_dec_post(contract_sim, [key["key_ID"], str(uuid.uuid4())]), 400, NOT_FOUND)
    assert _values(_dec_post(contract_sim, [key["key_ID"]])) == {key["key_ID"]: key["key"]}


def test_wrong_master_in_path_is_not_found_and_consumes_nothing(contract_sim: QkdSim) -> None:
    """Clause 5.3 (path = master) and spec note 6: a wrong master reveals nothing (400)."""
    key = _issue(contract_sim)[0]
    for path in ("/api/v1/keys/C/dec_keys", "/api/v1/keys/B/dec_keys"):
        assert_error(_dec_post(contract_sim, [key["key_ID"]], path=path), 400, NOT_FOUND)
    assert _values(_dec_get(contract_sim, key["key_ID"])) == {key["key_ID"]: key["key"]}


@pytest.mark.parametrize("query", ["", "?key_ID=a&key_ID=b", "?number=1",
                                   "?key_ID={id}&key_ID={id}"])
def test_get_form_takes_exactly_one_key_id(contract_sim: QkdSim, query: str) -> None:
    """Clause 5.3 / spec note 6: GET carries one key_ID; repeated values -> 400."""
    key = _issue(contract_sim)[0]
    resp = contract_sim.session("B").get(
        contract_sim.url("bob", DEC + query.format(id=key["key_ID"])), timeout=5)
    assert_error(resp, 400)
    # Nothing was consumed by the refused request.
    assert _values(_dec_get(contract_sim, key["key_ID"])) == {key["key_ID"]: key["key"]}


@pytest.mark.parametrize("body", [b"", b"{}", b'{"key_IDs": []}', b'{"key_IDs": "x"}',
                                  b'{"key_IDs": [{"id": "x"}]}', b"[1]", b"{",
                                  b'{"key_IDs": [{"key_ID": "%(id)s"}, {"key_ID": "%(id)s"}]}',
                                  b'{"key_IDs": [{"key_ID": "%(id)s"}], "extra": 1}'])
def test_malformed_key_ids_is_400(contract_sim: QkdSim, body: bytes) -> None:
    """Clause 4.4: key_IDs is a mandatory non-empty array of {key_ID}; anything else -> 400."""
    key = _issue(contract_sim)[0]
    resp = contract_sim.session("B").post(
        contract_sim.url("bob", DEC), data=body % {b"id": key["key_ID"].encode()},
        headers={"Content-Type": "application/json"}, timeout=5)
    assert_error(resp, 400)
    assert _values(_dec_get(contract_sim, key["key_ID"])) == {key["key_ID"]: key["key"]}


def test_key_id_extensions_are_accepted(contract_sim: QkdSim) -> None:
    """Clause 4.4: key_ID_extension and key_IDs_extension are optional objects."""
    key = _issue(contract_sim)[0]
    resp = contract_sim.session("B").post(contract_sim.url("bob", DEC), json={
        "key_IDs": [{"key_ID": key["key_ID"], "key_ID_extension": {"abc": 1}}],
        "key_IDs_extension": {"abc": 2}}, timeout=5)
    assert _values(resp) == {key["key_ID"]: key["key"]}


def test_uppercase_key_id_finds_the_key(contract_sim: QkdSim) -> None:
    """RFC 9562: UUIDs compare case-insensitively."""
    key = _issue(contract_sim)[0]
    resp = _dec_get(contract_sim, key["key_ID"].upper())
    assert _values(resp) == {key["key_ID"]: key["key"]}


def test_many_ids_in_one_post(contract_sim: QkdSim) -> None:
    """Clause 5.3: POST for two or more IDs; all returned, in one Key container."""
    keys = _issue(contract_sim, contract_sim.link.max_key_per_request, 64)
    got = _values(_dec_post(contract_sim, [k["key_ID"] for k in keys]))
    assert got == {k["key_ID"]: k["key"] for k in keys}


def test_error_bodies_are_etsi_errors(contract_sim: QkdSim) -> None:
    """Checklist: every 400/503 has Content-Type application/json and a string message."""
    for resp in (_dec_get(contract_sim, "x"), _dec_post(contract_sim, [str(uuid.uuid4())])):
        message = assert_error(resp, 400)
        assert message in (NOT_FOUND, "key_ID must be a UUID string")
    assert etsi014.MSG_KEYS_NOT_FOUND == NOT_FOUND
