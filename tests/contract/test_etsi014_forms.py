"""ETSI GS QKD 014 V1.1.1: every GET and POST form of enc_keys and dec_keys (issue 14).

Clause 5.2 (Get key) and clause 5.3 (Get key with key IDs) each define a POST
form carrying a JSON body (Key request, clause 4.2; Key IDs, clause 4.4) and a
GET form "for simple requests" carrying query parameters. The clients people
run use both: PSK rotators GET enc_keys?number=1&size=256 and
dec_keys?key_ID=..., IPsec plugins GET enc_keys and POST dec_keys, generated
clients POST with nulls. Each test names its clause; the tolerant readings are
those of kme/etsi014.py's module docstring. Every answer is checked against
the OpenAPI document the gateway serves. The federation is tests/trio.py:
master sae-a1 at A, slave sae-c1 at C (two hops away).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
import requests

from tests.contract.openapi import check_response
from tests.sae import Sae
from tests.trio import Trio

pytestmark = pytest.mark.integration

ENC = "/api/v1/keys/{slave_SAE_ID}/enc_keys"
DEC = "/api/v1/keys/{master_SAE_ID}/dec_keys"
ENC_URL = "/api/v1/keys/sae-c1/enc_keys"
DEC_URL = "/api/v1/keys/sae-a1/dec_keys"
NOT_FOUND = "one or more keys specified are not found on KME"


@pytest.fixture
def master(trio: Trio) -> Sae:
    return Sae(trio.manifest, "sae-a1")


@pytest.fixture
def slave(trio: Trio) -> Sae:
    return Sae(trio.manifest, "sae-c1")


def keys(resp: requests.Response, path: str = ENC) -> dict[str, bytes]:
    assert resp.status_code == 200, resp.text
    body = check_response("etsi014", resp.request.method or "GET", path, resp)
    return {k["key_ID"]: base64.b64decode(k["key"], validate=True) for k in body["keys"]}


def error(resp: requests.Response, path: str, status: int = 400) -> str:
    """Clause 4.5: a 400 carries the Error body, a string message."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = check_response("etsi014", resp.request.method or "GET", path, resp)
    return str(body["message"])


def raw_post(sae: Sae, path: str, body: bytes, **params: Any) -> requests.Response:
    return sae.session.post(sae.base + path, data=body, params=params, timeout=30,
                            headers={"Content-Type": "application/json"})


def issued(master: Sae, number: int = 1) -> dict[str, bytes]:
    return keys(master.enc_keys("sae-c1", number=number))


# -- enc_keys, clause 5.2 --------------------------------------------------------------------


def test_enc_keys_get_without_query(master: Sae) -> None:
    """Clause 5.2, GET form with no parameters: one key of the Status key_size (clause 4.2
    defaults: number 1, size = key_size)."""
    key_size = master.status("sae-c1").json()["key_size"]
    got = keys(master.get(ENC_URL))
    assert [len(v) * 8 for v in got.values()] == [key_size]


def test_enc_keys_get_with_number_and_size(master: Sae) -> None:
    """Clause 5.2, GET form: number and size as query parameters."""
    got = keys(master.get(ENC_URL, number=3, size=512))
    assert len(got) == 3 and {len(v) for v in got.values()} == {64}


@pytest.mark.parametrize("query", [{"additional_slave_SAE_IDs": "sae-b"}, {"numbr": "2"},
                                   {"number": ["1", "2"]}])
def test_enc_keys_get_refuses_what_only_post_carries(master: Sae,
                                                     query: dict[str, Any]) -> None:
    """Clause 5.2: the GET form carries number and size only, each once; anything else
    must be POSTed, and is refused rather than silently dropped."""
    error(master.get(ENC_URL, **query), ENC)


@pytest.mark.parametrize("body", [b"", b"{}", b'{"number": null, "size": null}',
                                  b'{"number": null, "size": null, "additional_slave_SAE_IDs":'
                                  b' null, "extension_mandatory": null, '
                                  b'"extension_optional": null}'])
def test_enc_keys_post_empty_request(master: Sae, body: bytes) -> None:
    """Clause 5.2 POST with clause 4.2's Key request, every item optional: zero bytes,
    {} and all-null (as generated clients send unset fields) mean one default key."""
    key_size = master.status("sae-c1").json()["key_size"]
    got = keys(raw_post(master, ENC_URL, body))
    assert [len(v) * 8 for v in got.values()] == [key_size]


def test_enc_keys_post_with_number_and_size(master: Sae) -> None:
    """Clause 5.2 POST, clause 4.2 number and size."""
    got = keys(master.enc_keys("sae-c1", number=2, size=128))
    assert len(got) == 2 and {len(v) for v in got.values()} == {16}


@pytest.mark.parametrize("optional", [[{"abc_route": "short"}], {"abc_route": "short"},
                                      "abc_route=short", [1, 2]])
def test_enc_keys_post_ignores_optional_extensions(master: Sae, optional: Any) -> None:
    """Clause 4.2: extension_optional entries the KME does not handle may be ignored,
    whatever they hold (an array of objects, one object, or a shape some clients use)."""
    assert len(keys(master.enc_keys("sae-c1", extension_optional=optional))) == 1


def test_enc_keys_post_mandatory_extension_and_unknown_field_are_400(master: Sae) -> None:
    """Clause 4.2: an unsupported extension_mandatory is 400 with the spec's message; an
    unknown Key request field is 400 too (a misspelled number must not become 1 key)."""
    assert error(master.enc_keys("sae-c1", extension_mandatory=[{"abc_route": "x"}]), ENC) \
        == "not all extension_mandatory parameters are supported"
    assert "numbr" in error(master.enc_keys("sae-c1", numbr=5), ENC)


def test_enc_keys_post_with_query_and_no_body(master: Sae) -> None:
    """Clause 5.2: a POST whose number/size came in the query string (and no body) is
    read like the GET form, not as an empty request that would give one key."""
    got = keys(raw_post(master, ENC_URL, b"", number=4, size=256))
    assert len(got) == 4


def test_enc_keys_post_with_both_body_and_query_is_400(master: Sae) -> None:
    """Clause 5.2: a request is either form; one carrying both is refused, never half-read."""
    error(raw_post(master, ENC_URL, b'{"number": 2}', number=4), ENC)


# -- dec_keys, clause 5.3 --------------------------------------------------------------------


def test_dec_keys_get_one_key_id(master: Sae, slave: Sae) -> None:
    """Clause 5.3, GET form: dec_keys?key_ID=<one UUID>."""
    sent = issued(master)
    (key_id,) = sent
    assert keys(slave.get(DEC_URL, key_ID=key_id), DEC) == sent


def test_dec_keys_get_several_key_ids_repeated(master: Sae, slave: Sae) -> None:
    """Clause 5.3, GET form with several IDs as repeated key_ID parameters: all read."""
    sent = issued(master, 3)
    got = keys(slave.get(DEC_URL, key_ID=list(sent)), DEC)
    assert got == sent


def test_dec_keys_get_several_key_ids_comma_separated(master: Sae, slave: Sae) -> None:
    """Clause 5.3, GET form with several IDs in one comma-separated key_ID: all read."""
    sent = issued(master, 2)
    assert keys(slave.get(DEC_URL, key_ID=",".join(sent)), DEC) == sent


def test_dec_keys_get_is_all_or_nothing(master: Sae, slave: Sae) -> None:
    """Clause 5.3 (spec note rule 4): one unknown ID among several -> 400 with the spec
    message and nothing taken; a repeated ID -> 400, nothing taken; no key_ID -> 400."""
    sent = issued(master, 2)
    first, second = sent
    assert error(slave.get(DEC_URL, key_ID=[first, str(uuid.uuid4())]), DEC) == NOT_FOUND
    error(slave.get(DEC_URL, key_ID=[first, first]), DEC)
    error(slave.get(DEC_URL, key_ID=f"{first},not-a-uuid"), DEC)
    error(slave.get(DEC_URL), DEC)
    assert keys(slave.get(DEC_URL, key_ID=[first, second]), DEC) == sent


def test_dec_keys_post_one_and_several(master: Sae, slave: Sae) -> None:
    """Clause 5.3 POST with clause 4.4 Key IDs: one ID, then two in one request."""
    sent = issued(master, 3)
    ids = list(sent)
    assert keys(slave.dec_keys("sae-a1", ids[:1]), DEC) == {ids[0]: sent[ids[0]]}
    assert keys(slave.dec_keys("sae-a1", ids[1:]), DEC) == {i: sent[i] for i in ids[1:]}


def test_dec_keys_post_ignores_extensions_and_unknown_fields(master: Sae, slave: Sae) -> None:
    """Clause 4.4: key_ID_extension and key_IDs_extension are optional and reserved; they
    and any unknown field are ignored (a Key IDs body means only its IDs)."""
    sent = issued(master, 2)
    first, second = sent
    body = {"key_IDs": [{"key_ID": first, "key_ID_extension": {"abc": 1}, "abc_note": "x"},
                        {"key_ID": second, "key": "echoed back by some clients"}],
            "key_IDs_extension": {"abc": 2}, "abc_request_id": 7}
    assert keys(slave.post(DEC_URL, body), DEC) == sent


def test_dec_keys_post_with_key_id_in_query_and_no_body(master: Sae, slave: Sae) -> None:
    """Clause 5.3: a POST with key_ID in the query and no body is read like the GET form."""
    sent = issued(master)
    assert keys(raw_post(slave, DEC_URL, b"", key_ID=next(iter(sent))), DEC) == sent


def test_dec_keys_post_with_both_body_and_query_is_400(master: Sae, slave: Sae) -> None:
    """Clause 5.3: a request carrying both forms is refused and consumes nothing."""
    sent = issued(master)
    (key_id,) = sent
    error(raw_post(slave, DEC_URL, b'{"key_IDs": [{"key_ID": "%s"}]}' % key_id.encode(),
                   key_ID=key_id), DEC)
    assert keys(slave.dec_keys("sae-a1", [key_id]), DEC) == sent


def test_dec_keys_post_keeps_the_rules_that_matter(master: Sae, slave: Sae) -> None:
    """Clause 4.4: key_IDs is mandatory and non-empty, every key_ID a UUID, no
    duplicates; tolerance of unknown fields does not extend to these."""
    sent = issued(master)
    (key_id,) = sent
    for body in ({"key_ids": [{"key_ID": key_id}]}, {"key_IDs": []},
                 {"key_IDs": [{"key_ID": "not-a-uuid"}]},
                 {"key_IDs": [{"id": key_id}]},
                 {"key_IDs": [{"key_ID": key_id}, {"key_ID": key_id}]}):
        error(slave.post(DEC_URL, body), DEC)
    assert keys(slave.dec_keys("sae-a1", [key_id]), DEC) == sent
