"""ETSI GS QKD 014 clause 5.2 (Get key), 4.2 (Key request), 4.3 (Key container).

Against the live emulator; each test names the checklist line (spec note
section 7) it checks.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any

import pytest
import requests

from kme import etsi014
from tests.contract.conftest import QkdSim, assert_error

pytestmark = pytest.mark.integration

ENC = "/api/v1/keys/B/enc_keys"


def _alice(sim: QkdSim) -> requests.Session:
    return sim.session("A")


def _get(sim: QkdSim, query: str = "") -> requests.Response:
    return _alice(sim).get(sim.url("alice", ENC + query), timeout=5)


def _post(sim: QkdSim, body: Any = None, raw: bytes | None = None) -> requests.Response:
    s = _alice(sim)
    if raw is not None:
        return s.post(sim.url("alice", ENC), data=raw, timeout=5,
                      headers={"Content-Type": "application/json"})
    return s.post(sim.url("alice", ENC), json=body, timeout=5)


def _keys(resp: requests.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    keys = resp.json()["keys"]
    assert isinstance(keys, list)
    return keys


def _decoded(key: dict[str, Any]) -> bytes:
    # Checklist: every returned key is valid standard base64 (RFC 4648).
    return base64.b64decode(key["key"], validate=True)


def test_get_without_query_gives_one_key_of_default_size(contract_sim: QkdSim) -> None:
    """Checklist: GET enc_keys with no query -> 200, exactly 1 key, length*8 == key_size."""
    keys = _keys(_get(contract_sim))
    assert len(keys) == 1
    assert len(_decoded(keys[0])) * 8 == contract_sim.link.key_size


@pytest.mark.parametrize("raw", [b"{}", b"", b"  \n"])
def test_post_empty_request_gives_one_key_of_default_size(contract_sim: QkdSim,
                                                          raw: bytes) -> None:
    """Checklist: POST {} -> 200 with 1 key of the default size (note 6: zero bytes too)."""
    keys = _keys(_post(contract_sim, raw=raw))
    assert len(keys) == 1
    assert len(_decoded(keys[0])) * 8 == contract_sim.link.key_size


def test_number_5_by_get_and_post(contract_sim: QkdSim) -> None:
    """Checklist: GET enc_keys?number=5 and POST {"number":5} each -> 200 with 5 keys."""
    assert len(_keys(_get(contract_sim, "?number=5"))) == 5
    assert len(_keys(_post(contract_sim, {"number": 5}))) == 5


def test_size_is_in_bits(contract_sim: QkdSim) -> None:
    """Checklist: GET enc_keys?number=1&size=1024 -> each key decodes to 128 bytes."""
    keys = _keys(_get(contract_sim, "?number=1&size=1024"))
    assert [len(_decoded(k)) for k in keys] == [128]
    keys = _keys(_post(contract_sim, {"number": 2, "size": 64}))
    assert [len(_decoded(k)) for k in keys] == [8, 8]


def test_key_ids_are_uuids_unique_across_calls(contract_sim: QkdSim) -> None:
    """Checklist: every key_ID is a UUID string; IDs are unique across calls.

    Also: a key given to one master is never returned by a later enc_keys,
    at either end (clause 5.2 post-condition): IDs and bytes never repeat.
    """
    ids: list[str] = []
    values: list[bytes] = []
    for _ in range(5):
        for k in _keys(_post(contract_sim, {"number": 4})):
            assert str(uuid.UUID(k["key_ID"])) == k["key_ID"].lower()
            ids.append(k["key_ID"])
            values.append(_decoded(k))
    bob = contract_sim.session("B")
    for _ in range(5):
        resp = bob.post(contract_sim.url("bob", "/api/v1/keys/A/enc_keys"),
                        json={"number": 4}, timeout=5)
        for k in _keys(resp):
            ids.append(k["key_ID"])
            values.append(_decoded(k))
    assert len(set(ids)) == len(ids) == 40
    assert len(set(values)) == len(values)


def test_every_key_is_standard_base64(contract_sim: QkdSim) -> None:
    """Checklist: every returned key is valid standard base64 (RFC 4648)."""
    for k in _keys(_post(contract_sim, {"number": 16, "size": 136})):
        try:
            raw = base64.b64decode(k["key"], validate=True)
        except binascii.Error:
            pytest.fail(f"not base64: {k['key']!r}")
        assert base64.b64encode(raw).decode() == k["key"]
        assert len(raw) == 17


def test_number_zero_is_400(contract_sim: QkdSim) -> None:
    """Checklist: GET enc_keys with number=0 -> 400 with an Error body (message string)."""
    assert_error(_get(contract_sim, "?number=0"), 400)
    assert_error(_post(contract_sim, {"number": 0}), 400)


@pytest.mark.parametrize("value", ["-8", "abc", "1.5", "", "5e1"])
def test_bad_number_get_is_400(contract_sim: QkdSim, value: str) -> None:
    """Checklist: number=-8 or number=abc (GET) -> 400 with an Error body."""
    assert_error(_get(contract_sim, f"?number={value}"), 400)


@pytest.mark.parametrize("value", [-8, "abc", "5", 1.5, True, [5], {"n": 5}])
def test_bad_number_post_is_400(contract_sim: QkdSim, value: Any) -> None:
    """Checklist: number=-8 or number=abc (POST) -> 400 with an Error body."""
    assert_error(_post(contract_sim, {"number": value}), 400)


@pytest.mark.parametrize("value", ["0", "-8", "abc"])
def test_bad_size_get_is_400(contract_sim: QkdSim, value: str) -> None:
    """Checklist: size=0, size=-8, size=abc (GET) -> 400 with an Error body."""
    assert_error(_get(contract_sim, f"?size={value}"), 400)


@pytest.mark.parametrize("value", [0, -8, "abc", 256.0, False])
def test_bad_size_post_is_400(contract_sim: QkdSim, value: Any) -> None:
    """Checklist: size=0, size=-8, size=abc (POST) -> 400 with an Error body."""
    assert_error(_post(contract_sim, {"size": value}), 400)


def test_size_not_multiple_of_8_on_bytes_only_kme(contract_sim: QkdSim) -> None:
    """Checklist: size=17 on a bytes-only KME -> 400, message `size shall be a multiple of 8`."""
    assert_error(_get(contract_sim, "?size=17"), 400, "size shall be a multiple of 8")
    assert_error(_post(contract_sim, {"size": 17}), 400, "size shall be a multiple of 8")
    assert_error(_post(contract_sim, {"size": 1023}), 400, "size shall be a multiple of 8")


def test_number_above_max_key_per_request_is_400(contract_sim: QkdSim) -> None:
    """Checklist: number > max_key_per_request -> 400 with an Error body (rec)."""
    top = contract_sim.link.max_key_per_request
    assert len(_keys(_post(contract_sim, {"number": top, "size": 64}))) == top
    assert_error(_post(contract_sim, {"number": top + 1}), 400)
    assert_error(_get(contract_sim, f"?number={top + 1}"), 400)


def test_size_outside_min_max_is_400(contract_sim: QkdSim) -> None:
    """Checklist: size outside [min_key_size, max_key_size] -> 400 with an Error body (rec)."""
    link = contract_sim.link
    assert len(_keys(_post(contract_sim, {"size": link.min_key_size}))) == 1
    assert len(_keys(_post(contract_sim, {"size": link.max_key_size}))) == 1
    for size in (link.min_key_size - 8, link.max_key_size + 8):
        assert_error(_post(contract_sim, {"size": size}), 400)
        assert_error(_get(contract_sim, f"?size={size}"), 400)


def test_empty_additional_slaves_is_400(contract_sim: QkdSim) -> None:
    """Checklist: additional_slave_SAE_IDs: [] -> 400 (rec)."""
    assert_error(_post(contract_sim, {"additional_slave_SAE_IDs": []}), 400)


@pytest.mark.parametrize("extra", [["C", "C"], ["A"], ["B"]])
def test_duplicate_master_or_slave_in_additional_slaves_is_400(contract_sim: QkdSim,
                                                                extra: list[str]) -> None:
    """Checklist: additional_slave_SAE_IDs with a duplicate, the master or the path slave -> 400."""
    assert_error(_post(contract_sim, {"additional_slave_SAE_IDs": extra}), 400)


def test_more_additional_slaves_than_max_sae_id_count_is_400(contract_sim: QkdSim) -> None:
    """Checklist: more additional_slave_SAE_IDs than max_SAE_ID_count (any when 0) -> 400.

    The emulated device is point-to-point (max_SAE_ID_count 0), so the
    multicast checklist line ("keys issued with additional_slave_SAE_IDs:[C]
    -> slave C gets 200") does not apply: multicast is optional (Annex B),
    and the request is refused here instead. The node's southbound client
    strips these fields before asking a device (kme.qkd.sanitize).
    """
    status = contract_sim.session("A").get(
        contract_sim.url("alice", "/api/v1/keys/B/status"), timeout=5).json()
    assert status["max_SAE_ID_count"] == 0
    message = assert_error(_post(contract_sim, {"additional_slave_SAE_IDs": ["C"]}), 400)
    assert "max_SAE_ID_count" in message


def test_path_slave_equal_to_caller_is_400(contract_sim: QkdSim) -> None:
    """Checklist: enc_keys where the path slave equals the caller -> 400 (rec)."""
    resp = _alice(contract_sim).get(contract_sim.url("alice", "/api/v1/keys/A/enc_keys"),
                                    timeout=5)
    assert_error(resp, 400)


def test_unknown_path_slave_is_400(contract_sim: QkdSim) -> None:
    """Paper IV-A.1: a device refuses a slave it does not know (here C) with 400."""
    resp = _alice(contract_sim).get(contract_sim.url("alice", "/api/v1/keys/C/enc_keys"),
                                    timeout=5)
    assert_error(resp, 400)


@pytest.mark.parametrize("ext", [[{"abc_route_type": "direct"}], {"abc_route_type": "direct"},
                                 [{"kmstn_x": 1}, {"abc_y": {"nested": [1, 2]}}]])
def test_unsupported_extension_mandatory_is_400(contract_sim: QkdSim, ext: Any) -> None:
    """Checklist: unsupported extension_mandatory entry -> 400, the spec's message.

    Both the spec's array of objects and the plain object some clients send.
    """
    resp = _post(contract_sim, {"extension_mandatory": ext})
    assert_error(resp, 400, "not all extension_mandatory parameters are supported")
    details = resp.json()["details"]
    assert isinstance(details, list) and all(isinstance(d, dict) for d in details)


@pytest.mark.parametrize("ext", [[{"abc_hint": 1}], {"abc_hint": {"x": True}}])
def test_unknown_extension_optional_is_ignored(contract_sim: QkdSim, ext: Any) -> None:
    """Checklist: unknown extension_optional entry -> 200 (ignored)."""
    assert len(_keys(_post(contract_sim, {"number": 2, "extension_optional": ext}))) == 2


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"x"', b"\xff\xfe", b'{"numbr": 2}',
                                 b'{"number": 1, "number": 2}'])
def test_malformed_key_request_is_400(contract_sim: QkdSim, raw: bytes) -> None:
    """Status codes table / spec note 6: a malformed POST body is 400, not a default."""
    assert_error(_post(contract_sim, raw=raw), 400)


@pytest.mark.parametrize("query", ["?number=1&number=2", "?size=64&size=64",
                                   "?additional_slave_SAE_IDs=C", "?foo=1"])
def test_get_form_takes_only_single_number_and_size(contract_sim: QkdSim, query: str) -> None:
    """Clause 5.2: GET only for number and/or size; anything else must be POSTed."""
    assert_error(_get(contract_sim, query), 400)


def test_stored_key_count_drops_by_number(contract_sim: QkdSim) -> None:
    """Checklist: Status stored_key_count drops by number after a successful enc_keys.

    Generation is stopped in this emulator (rate_multiplier 0), so the
    count changes only by what is taken; both ends share the one store.
    """
    s = _alice(contract_sim)
    status_url = contract_sim.url("alice", "/api/v1/keys/B/status")
    before = s.get(status_url, timeout=5).json()["stored_key_count"]
    assert before >= 7
    assert len(_keys(_post(contract_sim, {"number": 7}))) == 7
    assert s.get(status_url, timeout=5).json()["stored_key_count"] == before - 7
    bob_status = contract_sim.session("B").get(
        contract_sim.url("bob", "/api/v1/keys/A/status"), timeout=5).json()
    assert bob_status["stored_key_count"] == before - 7
    # Refused requests take nothing.
    assert_error(_post(contract_sim, {"number": 0}), 400)
    assert s.get(status_url, timeout=5).json()["stored_key_count"] == before - 7


def test_more_keys_than_stored_is_503_and_takes_nothing(contract_sim: QkdSim) -> None:
    """Checklist: a request for more keys than are stored -> 503 with an Error body (rec)."""
    s = _alice(contract_sim)
    status_url = contract_sim.url("alice", "/api/v1/keys/B/status")
    stored = s.get(status_url, timeout=5).json()["stored_key_count"]
    top = contract_sim.link.max_key_per_request
    max_size = contract_sim.link.max_key_size
    assert top * max_size > stored * contract_sim.link.key_size, "store too full for this test"
    resp = _post(contract_sim, {"number": top, "size": max_size})
    assert_error(resp, 503, etsi014.MSG_INSUFFICIENT_KEY)
    assert s.get(status_url, timeout=5).json()["stored_key_count"] == stored
