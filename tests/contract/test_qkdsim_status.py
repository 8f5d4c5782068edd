"""ETSI GS QKD 014 clause 5.1 (Get status) and 4.1 (Status) against the live emulator."""

from __future__ import annotations

import pytest

from tests.contract.conftest import QkdSim, assert_error

pytestmark = pytest.mark.integration

STATUS_FIELDS = {
    "source_KME_ID": str, "target_KME_ID": str, "master_SAE_ID": str, "slave_SAE_ID": str,
    "key_size": int, "stored_key_count": int, "max_key_count": int,
    "max_key_per_request": int, "max_key_size": int, "min_key_size": int,
    "max_SAE_ID_count": int,
}


@pytest.mark.parametrize(("end", "caller", "slave"), [("alice", "A", "B"), ("bob", "B", "A")])
def test_status_has_all_11_fields_with_json_types(contract_sim: QkdSim, end: str, caller: str,
                                                  slave: str) -> None:
    """Checklist: GET status -> 200; all 11 mandatory Status fields with the right JSON types."""
    resp = contract_sim.session(caller).get(
        contract_sim.url(end, f"/api/v1/keys/{slave}/status"), timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert set(STATUS_FIELDS) <= set(body)
    for name, kind in STATUS_FIELDS.items():
        assert type(body[name]) is kind, name  # bool is not an int here
    link = contract_sim.link
    own, peer = (contract_sim.alice, contract_sim.bob) if end == "alice" else (
        contract_sim.bob, contract_sim.alice)
    assert body["source_KME_ID"] == own.kme_id
    assert body["target_KME_ID"] == peer.kme_id
    assert body["key_size"] == link.key_size == 256
    assert body["max_key_count"] == link.max_key_count == 1000
    assert body["max_key_per_request"] == link.max_key_per_request == 64
    assert body["max_key_size"] == link.max_key_size
    assert body["min_key_size"] == link.min_key_size
    assert body["max_SAE_ID_count"] == 0  # a point-to-point device: no multicast
    assert 0 <= body["stored_key_count"] <= body["max_key_count"]


def test_status_names_caller_from_certificate_and_slave_from_path(contract_sim: QkdSim) -> None:
    """Checklist: master_SAE_ID = the SAE ID of the caller's certificate; slave = the path."""
    body = contract_sim.session("A").get(
        contract_sim.url("alice", "/api/v1/keys/B/status"), timeout=5).json()
    assert body["master_SAE_ID"] == "A"
    assert body["slave_SAE_ID"] == "B"


def test_status_path_slave_equal_to_caller_is_400(contract_sim: QkdSim) -> None:
    """Spec note 5.7 [rec]: a master SAE ID equal to the slave SAE ID -> 400."""
    resp = contract_sim.session("A").get(contract_sim.url("alice", "/api/v1/keys/A/status"),
                                         timeout=5)
    assert_error(resp, 400)


@pytest.mark.parametrize("slave", ["C", "", "%20", "a%2Fb"])
def test_status_unknown_or_invalid_slave_is_400(contract_sim: QkdSim, slave: str) -> None:
    """Spec note 5.7 [rec]: an empty/blank or unknown path SAE ID -> 400 (never 404/500)."""
    resp = contract_sim.session("A").get(
        contract_sim.url("alice", f"/api/v1/keys/{slave}/status"), timeout=5)
    assert_error(resp, 400)
