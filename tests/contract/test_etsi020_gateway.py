"""ETSI GS QKD 020 V1.1.1 conformance of kmstn's 020 gateway (spec note section 9).

The plain form: the test speaks as the foreign KMS F (site link to B) with an
ordinary TLS 1.3 client (Python ssl, classical groups) and plain JSON, built
from the published schema only. The sealed form: the same flows between kmstn
nodes, driven through ETSI 014 (A->B->C) and checked end to end. Each test
names the checklist line it checks; every response is validated against the
OpenAPI document the gateway serves (gateway/openapi/etsi020.yaml).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.contract.openapi import check_response
from tests.sae import Sae, key_map
from tests.trio import EMPTY_LINK_KEYS, HOSTS, Trio

pytestmark = pytest.mark.integration

EXT = "/kmapi/v1/ext_keys"
ACK = "/kmapi/v1/ext_keys/ack"
VOID = "/kmapi/v1/ext_keys/void"


class Foreign:
    """The foreign KMS F talking plain ETSI 020 to B."""

    def __init__(self, trio: Trio) -> None:
        self.trio = trio
        self.session = trio.foreign_session()
        self.b = trio.node("B")["etsi020_url"]
        self.callback = trio.foreign_url + ACK

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> requests.Response:
        data = raw if raw is not None else json.dumps(body).encode()
        return self.session.post(self.b + path, data=data, timeout=30,
                                 headers={"Content-Type": "application/json"})

    def ext_keys(self, targets: list[str], keys: list[tuple[str, str]] | None = None,
                 callback: bool = True, **extra: Any) -> tuple[requests.Response, list[str]]:
        keys = keys or [(str(uuid.uuid4()), base64.b64encode(os.urandom(32)).decode())]
        body = {"keys": [{"key_id": k, "value": v} for k, v in keys],
                "initiator_sae_id": "sae-f", "target_sae_ids": targets, **extra}
        if callback:
            body["ack_callback_url"] = self.callback
        return self.post(EXT, body), [k for k, _ in keys]

    def inspect(self, what: str, url: str | None = None) -> Any:
        return self.session.get((url or self.trio.foreign_url) + f"/test/{what}",
                                timeout=10).json()

    def acks_for(self, key_id: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The acks F received that name key_id (waits for at least one)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [a for a in self.inspect("acks")
                     if {"key_id": key_id} in a["key_id_container"]]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture
def f(trio: Trio) -> Foreign:
    return Foreign(trio)


def problem(resp: requests.Response, status: int, path: str, key: str | None = None) -> Any:
    """Checklist: every error is application/json with a `type` string; details
    (when present) an object of string values."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")
    body = check_response("etsi020", "POST", path, resp)
    assert isinstance(body["type"], str) and body["type"]
    assert all(isinstance(v, str) for v in body.get("details", {}).values())
    if key is not None:
        assert key in body["details"], body
    return body


def wait_until(fn: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.05)
    return False


def dec_keys(trio: Trio, sae: str, master: str, ids: list[str]) -> requests.Response:
    return Sae(trio.manifest, sae).dec_keys(master, ids)


# -- transport and versions --------------------------------------------------------


def test_versions(f: Foreign) -> None:
    """GET /kmapi/versions -> 200 with "v1"; synchronous_mode is advertised."""
    resp = f.session.get(f.b + "/kmapi/versions", timeout=10)
    body = check_response("etsi020", "GET", "/kmapi/versions", resp)
    assert resp.status_code == 200 and "v1" in body["versions"]
    assert "synchronous_mode" in body["capabilities"]


def test_tls13_only_and_trusted_certificates(trio: Trio, f: Foreign) -> None:
    """TLS 1.2 refused, TLS 1.3 accepted; no or untrusted client certificate rejected."""
    certs = trio.root / "state" / "pki" / "certs"
    port = int(f.b.rsplit(":", 1)[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(trio.ca)
    ctx.load_cert_chain(str(certs / "F.pem"), str(certs / "F.key"))
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"), \
            socket.create_connection((HOSTS["B"], port), 5) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOSTS["B"]):
        pass
    anon = requests.Session()
    anon.trust_env = False
    with pytest.raises(requests.exceptions.ConnectionError):
        anon.get(f.b + "/kmapi/versions", verify=trio.ca, timeout=10)
    # A valid certificate of an SAE (not a neighbour KMS): 401 problem details.
    sae = Sae(trio.manifest, "sae-b")
    resp = sae.session.get(f.b + "/kmapi/versions", timeout=10)
    assert resp.status_code == 401 and resp.json()["type"].endswith("/unauthorized")


# -- ext_keys -------------------------------------------------------------------------------


def test_async_ext_keys_202_then_one_ack_per_key(trio: Trio, f: Foreign) -> None:
    """A valid ext_keys with ack_callback_url -> 202 with an empty body; the peer then
    receives an array of ack containers naming every key_id exactly once; a key acked
    relayed is retrievable by its target via ETSI 014."""
    keys = [(str(uuid.uuid4()), base64.b64encode(os.urandom(32)).decode()) for _ in range(3)]
    resp, ids = f.ext_keys(["sae-c1"], keys)
    assert resp.status_code == 202 and resp.content == b""
    check_response("etsi020", "POST", EXT, resp)
    assert wait_until(lambda: all(f.acks_for(k, 0) for k in ids))
    acks = [a for a in f.inspect("acks") if any({"key_id": k} in a["key_id_container"]
                                                for k in ids)]
    check_response("etsi020", "POST", ACK, _fake_resp(200, b""))  # our ack answer shape
    named = [c["key_id"] for a in acks for c in a["key_id_container"]]
    assert sorted(named) == sorted(ids)  # each key in exactly one container
    for a in acks:
        assert a["ack_status"] == "relayed" and a["target_sae_ids"] == ["sae-c1"]
    got = key_map(dec_keys(trio, "sae-c1", "sae-f", ids))
    assert {k: base64.b64encode(v).decode() for k, v in got.items()} == dict(keys)


def _fake_resp(status: int, body: bytes) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = body
    return r


def test_sync_ext_keys_returns_ack_containers(trio: Trio, f: Foreign) -> None:
    """Without ack_callback_url (synchronous_mode) -> 200 with ack_containers, no later POST."""
    resp, ids = f.ext_keys(["sae-a2"], callback=False)
    body = check_response("etsi020", "POST", EXT, resp)
    assert resp.status_code == 200
    assert [(a["ack_status"], a["key_id_container"]) for a in body] == \
        [("relayed", [{"key_id": ids[0]}])]
    time.sleep(0.5)
    assert f.acks_for(ids[0], 0) == []
    assert dec_keys(trio, "sae-a2", "sae-f", ids).status_code == 200


def test_our_ack_endpoint_answers_200_to_a_valid_ack(trio: Trio, f: Foreign) -> None:
    """The callback receiver (ours) answers 200 to a valid ack array: B forwards a key to
    F in asynchronous mode, F acks to B's callback, and records B's answer."""
    keys = key_map(Sae(trio.manifest, "sae-a1").enc_keys("sae-f"))
    key_id = next(iter(keys))
    assert wait_until(lambda: any(key_id in r["key_ids"] for r in f.inspect("ack_results")))
    results = [r for r in f.inspect("ack_results") if key_id in r["key_ids"]]
    assert [r["status"] for r in results] == [200]
    # And what B sent F carried the callback URL of B's own ack endpoint.
    sent = [r for r in f.inspect("requests") if r["path"] == EXT
            and r["body"]["keys"][0]["key_id"] == key_id]
    assert sent[0]["body"]["ack_callback_url"] == trio.node("B")["etsi020_url"] + ACK


@pytest.mark.parametrize(("change", "reason"), [
    (lambda b: b.pop("keys"), "keys"),
    (lambda b: b.pop("initiator_sae_id"), "initiator_sae_id"),
    (lambda b: b.pop("target_sae_ids"), "target_sae_ids"),
    (lambda b: b["keys"][0].update(key_id="not-a-uuid"), "key_id"),
    (lambda b: b["keys"][0].update(value="%%%not base64%%%"), "base64"),
    (lambda b: b.update(initiator_sae_id="x" * 65), "initiator_sae_id"),
    (lambda b: b.update(target_sae_ids=["has space"]), "target_sae_ids"),
    (lambda b: b.update(ack_callback_url="http://127.0.0.34/ack"), "https"),
    (lambda b: b.update(ack_callback_url="https://x/" + "a" * 1024), "1024"),
])
def test_ext_keys_bad_requests(f: Foreign, change: Callable[[dict[str, Any]], Any],
                               reason: str) -> None:
    """Missing fields, bad UUID, bad base64, bad SAE IDs, a callback that is not https:// or
    too long -> 400 problem details (and nothing kept: the same IDs work afterwards)."""
    key_id = str(uuid.uuid4())
    body: dict[str, Any] = {
        "keys": [{"key_id": key_id, "value": base64.b64encode(os.urandom(32)).decode()}],
        "initiator_sae_id": "sae-f", "target_sae_ids": ["sae-a2"],
        "ack_callback_url": f.callback}
    change(body)
    details = problem(f.post(EXT, body), 400, EXT)["details"]
    assert any(reason in v for v in details.values()) or reason in json.dumps(details)


def test_ext_keys_not_json(f: Foreign) -> None:
    problem(f.post(EXT, raw=b"{not json"), 400, EXT, "missing_parameters")


def test_unknown_target_and_route_back(f: Foreign) -> None:
    """Unknown target -> 400 target_sae_id_not_recognized; a route straight back to the
    caller -> 400 invalid_routing."""
    problem(f.ext_keys(["nobody-here"])[0], 400, EXT, "target_sae_id_not_recognized")
    problem(f.ext_keys(["sae-f"])[0], 400, EXT, "invalid_routing")


def test_two_targets_are_supported(trio: Trio, f: Foreign) -> None:
    """We support several targets (the one-target 503 does not apply): both get the key."""
    resp, ids = f.ext_keys(["sae-a2", "sae-c2"], callback=False)
    assert resp.status_code == 200
    assert {s["ack_status"] for s in check_response("etsi020", "POST", EXT, resp)} == \
        {"relayed"}
    for sae in ("sae-a2", "sae-c2"):
        assert dec_keys(trio, sae, "sae-f", ids).status_code == 200


def test_extensions(trio: Trio, f: Foreign) -> None:
    """Unknown extension_mandatory -> 503 unsupported_mandatory_extension; unknown
    extension_optional -> accepted and forwarded unchanged on the next hops
    (F -> B -> C -> G, where G is another foreign KMS that records what it got)."""
    problem(f.ext_keys(["sae-a2"], extension_mandatory={"E99999_route": "x"})[0], 503, EXT,
            "unsupported_mandatory_extension")
    opt = {"E99999_hint": {"deep": [1, 2, {"x": "y"}]}}
    resp, ids = f.ext_keys(["sae-g"], callback=False, extension_optional=opt)
    assert resp.status_code == 200, resp.text
    got = [r["body"] for r in f.inspect("requests", trio.other_foreign_url)
           if r["path"] == EXT and r["body"]["keys"][0]["key_id"] == ids[0]]
    assert got and got[0]["extension_optional"] == opt


def test_retry_after_400_is_new_and_resend_is_idempotent(trio: Trio, f: Foreign) -> None:
    """After a 400 the same key IDs are treated as new; an identical resend creates no
    duplicate; the same key_id with a different value is refused and the original kept."""
    key = (str(uuid.uuid4()), base64.b64encode(os.urandom(32)).decode())
    problem(f.ext_keys(["nobody-here"], [key], callback=False)[0], 400, EXT)
    for _ in range(2):  # first send, then an identical resend
        resp, _ = f.ext_keys(["sae-a2"], [key], callback=False)
        assert resp.status_code == 200 and resp.json()[0]["ack_status"] == "relayed"
    other = (key[0], base64.b64encode(os.urandom(32)).decode())
    resp, _ = f.ext_keys(["sae-a2"], [other], callback=False)
    assert resp.status_code in (200, 400)
    if resp.status_code == 200:
        assert resp.json()[0]["ack_status"] == "failed"
    got = dec_keys(trio, "sae-a2", "sae-f", [key[0]])
    assert got.json()["keys"][0]["key"] == key[1]
    assert dec_keys(trio, "sae-a2", "sae-f", [key[0]]).status_code == 400  # exactly once


def test_insufficient_key_material_gives_failed(trio: Trio, f: Foreign) -> None:
    """Insufficient key material for the relay -> sync: 200 with a failed container.

    H's QKD link to A starts with a few keys and makes none: drain it, then ask
    B (via F) to relay a key to an SAE at H, which needs one more QKD key on A-H.
    """
    master = Sae(trio.manifest, "sae-a1")
    left = master.status("sae-h").json()["stored_key_count"]
    assert left == EMPTY_LINK_KEYS
    drained = key_map(master.enc_keys("sae-h", number=left))
    assert dec_keys(trio, "sae-h", "sae-a1", list(drained)).status_code == 200
    assert master.status("sae-h").json()["stored_key_count"] == 0
    resp, ids = f.ext_keys(["sae-h"], callback=False)
    body = check_response("etsi020", "POST", EXT, resp)
    assert resp.status_code == 200 and [a["ack_status"] for a in body] == ["failed"]
    assert dec_keys(trio, "sae-h", "sae-f", ids).status_code == 400


# -- acks -----------------------------------------------------------------------------------


def test_bad_acks(f: Foreign) -> None:
    """ack_status outside the enum -> 400; not JSON / not an array -> 400 ack_not_understood;
    an ack for key IDs never sent -> 400 key_not_present."""
    ack = {"key_id_container": [{"key_id": str(uuid.uuid4())}], "ack_status": "relayed",
           "initiator_sae_id": "sae-a1", "target_sae_ids": ["sae-f"]}
    problem(f.post(ACK, [{**ack, "ack_status": "done"}]), 400, ACK, "ack_not_understood")
    problem(f.post(ACK, raw=b"not json"), 400, ACK, "ack_not_understood")
    problem(f.post(ACK, raw=b'"a string"'), 400, ACK, "ack_not_understood")
    problem(f.post(ACK, [ack]), 400, ACK, "key_not_present")
    problem(f.post(ACK, ack), 400, ACK, "key_not_present")  # a single object: lenient


# -- void -----------------------------------------------------------------------------------


def test_void_async_then_voided_and_dec_keys_fails(trio: Trio, f: Foreign) -> None:
    """void with key_ids -> 202, then an ack voided; afterwards dec_keys fails (400)."""
    resp, ids = f.ext_keys(["sae-c2"], callback=False)
    assert resp.status_code == 200
    body = {"key_ids": ids, "initiator_sae_id": "sae-f", "target_sae_ids": ["sae-c2"],
            "ack_callback_url": f.callback}
    resp = f.post(VOID, body)
    assert resp.status_code == 202 and resp.content == b""
    assert wait_until(lambda: any(a["ack_status"] == "voided" for a in f.acks_for(ids[0], 0)))
    assert dec_keys(trio, "sae-c2", "sae-f", ids).status_code == 400


def test_void_outcomes_in_sync_mode(trio: Trio, f: Foreign) -> None:
    """Sync void -> 200 with ack_containers and no later ack; delivered -> failed to void;
    unknown -> key not present."""
    resp, delivered = f.ext_keys(["sae-a2"], callback=False)
    assert dec_keys(trio, "sae-a2", "sae-f", delivered).status_code == 200
    resp, held = f.ext_keys(["sae-a2"], callback=False)
    unknown = str(uuid.uuid4())
    resp = f.post(VOID, {"key_ids": [delivered[0], held[0], unknown],
                         "initiator_sae_id": "sae-f", "target_sae_ids": ["sae-a2"]})
    body = check_response("etsi020", "POST", VOID, resp)
    assert resp.status_code == 200
    status = {c["key_id"]: a["ack_status"] for a in body for c in a["key_id_container"]}
    assert status == {delivered[0]: "failed to void", held[0]: "voided",
                      unknown: "key not present"}
    time.sleep(0.5)
    assert f.acks_for(held[0], 0) == []  # no later ack POST in sync mode


def test_void_all_needs_confirmation_and_spares_other_pairs(trio: Trio, f: Foreign) -> None:
    """key_ids [] without all_confirmation -> 400 no_all_confirmation; with it, only keys of
    that initiator/target set are voided."""
    body: dict[str, Any] = {"key_ids": [], "initiator_sae_id": "sae-f",
                            "target_sae_ids": ["sae-c1"]}
    problem(f.post(VOID, body), 400, VOID, "no_all_confirmation")
    _, mine = f.ext_keys(["sae-c1"], callback=False)
    _, other_target = f.ext_keys(["sae-c2"], callback=False)
    other_master = list(key_map(Sae(trio.manifest, "sae-a1").enc_keys("sae-c1")))
    resp = f.post(VOID, {**body, "all_confirmation": True})
    assert resp.status_code == 200
    assert dec_keys(trio, "sae-c1", "sae-f", mine).status_code == 400
    assert dec_keys(trio, "sae-c2", "sae-f", other_target).status_code == 200
    assert dec_keys(trio, "sae-c1", "sae-a1", other_master).status_code == 200
    # Again: nothing is left to void on C, which says so with [] through B.
    again = f.post(VOID, {**body, "all_confirmation": True})
    assert again.status_code == 200
    assert again.json() == []


# -- transport edge cases ---------------------------------------------------------------------


def test_request_cut_off_mid_body(trio: Trio) -> None:
    """A request cut off mid-body -> 408 problem details or the connection is closed."""
    certs = trio.root / "state" / "pki" / "certs"
    ctx = ssl.create_default_context(cafile=trio.ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(str(certs / "F.pem"), str(certs / "F.key"))
    port = int(trio.node("B")["etsi020_url"].rsplit(":", 1)[1])
    with socket.create_connection((HOSTS["B"], port), 10) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOSTS["B"]) as tls:
        tls.sendall(b"POST /kmapi/v1/ext_keys HTTP/1.1\r\nHost: b\r\nContent-Type: "
                    b"application/json\r\nContent-Length: 500\r\n\r\n{\"keys\": [")
        tls.settimeout(60)
        answer = b""
        try:
            while chunk := tls.recv(4096):
                answer += chunk
        except (ssl.SSLError, ConnectionError):
            pass
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"timeout"' in answer  # problem details with details.timeout
