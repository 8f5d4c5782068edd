"""kme.etsi014's lenient reading for the northbound gateway (issue 14), and that the
strict default (the QKD device emulator's) is unchanged. Clauses of ETSI GS QKD 014."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from kme import etsi014
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import KeyLimits

LIMITS = KeyLimits(key_size=256, min_key_size=64, max_key_size=1024, max_key_per_request=128,
                   max_sae_id_count=2)


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def refused(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(KmstnError) as err:
        fn(*args, **kwargs)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    return err.value.public


# -- dec_keys GET, clause 5.3 -----------------------------------------------------------------


def test_query_takes_several_ids_repeated_or_comma_separated() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    read = etsi014.parse_key_ids_query
    assert read({"key_ID": [str(a)]}, lenient=True) == [a]
    assert read({"key_ID": [str(a), str(b)]}, lenient=True) == [a, b]
    assert read({"key_ID": [f"{a},{b}", str(c).upper()]}, lenient=True) == [a, b, c]
    assert read({"key_ID": [f"{a}, {b}"]}, lenient=True) == [a, b]


@pytest.mark.parametrize("args", [
    {}, {"key_ID": []}, {"key_ID": [""]}, {"key_ID": ["a,"]},
    {"key_ID": ["00000000-0000-0000-0000-000000000001"] * 2},
    {"key_ID": ["00000000-0000-0000-0000-000000000001,00000000-0000-0000-0000-000000000001"]},
    {"key_ID": ["00000000-0000-0000-0000-000000000001,non-uuid"]},
    {"key_ID": ["00000000-0000-0000-0000-000000000001"], "number": ["1"]},
])
def test_query_still_refuses_what_matters(args: dict[str, list[str]]) -> None:
    refused(etsi014.parse_key_ids_query, args, lenient=True)


def test_query_is_bounded() -> None:
    ids = ",".join(str(uuid.uuid4()) for _ in range(11))
    assert "more than 10" in refused(etsi014.parse_key_ids_query, {"key_ID": [ids]},
                                     lenient=True, max_ids=10)


def test_strict_query_still_takes_exactly_one() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    refused(etsi014.parse_key_ids_query, {"key_ID": [str(a), str(b)]})
    refused(etsi014.parse_key_ids_query, {"key_ID": [f"{a},{b}"]})


# -- dec_keys POST, clause 4.4 --------------------------------------------------------------


def test_body_ignores_unknown_fields_when_lenient() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    raw = body({"key_IDs": [{"key_ID": str(a), "key_ID_extension": "any JSON", "x": 1},
                            {"key_ID": str(b), "key": "echoed"}],
                "key_IDs_extension": [1], "abc_request": 2})
    assert etsi014.parse_key_ids_body(raw, lenient=True) == [a, b]
    refused(etsi014.parse_key_ids_body, raw)  # the emulator's strict reading is unchanged


@pytest.mark.parametrize("obj", [
    {}, {"key_ids": [{"key_ID": "00000000-0000-0000-0000-000000000001"}]}, {"key_IDs": []},
    {"key_IDs": [{"id": "00000000-0000-0000-0000-000000000001"}]},
    {"key_IDs": [{"key_ID": "non-uuid"}]},
    {"key_IDs": [{"key_ID": "00000000-0000-0000-0000-000000000001"}] * 2},
])
def test_body_still_refuses_what_matters(obj: Any) -> None:
    refused(etsi014.parse_key_ids_body, body(obj), lenient=True)


# -- enc_keys POST, clause 4.2 -----------------------------------------------------------------


@pytest.mark.parametrize("optional", ["abc=1", 5, [1], [{"a": 1}, "b"], True])
def test_odd_optional_extensions_are_ignored_when_lenient(optional: Any) -> None:
    raw = body({"number": 2, "extension_optional": optional})
    req = etsi014.parse_key_request_body(raw, LIMITS, lenient=True)
    assert (req.number, req.extension_optional) == (2, ())
    refused(etsi014.parse_key_request_body, raw, LIMITS)


@pytest.mark.parametrize("obj", [{"numbr": 2}, {"extension_mandatory": "abc=1"},
                                 {"extension_mandatory": [{"abc_route": 1}]}])
def test_key_request_still_refuses_what_matters(obj: Any) -> None:
    with pytest.raises(KmstnError):
        etsi014.parse_key_request_body(body(obj), LIMITS, lenient=True)


# -- the gateway's reading of both forms ----------------------------------------------------------


def test_read_key_request_get_post_and_post_with_query() -> None:
    read = etsi014.read_key_request
    assert read("GET", {"number": ["3"], "size": ["512"]}, b"", LIMITS).number == 3
    assert read("POST", {}, body({"number": 4}), LIMITS).number == 4
    assert read("POST", {}, b"", LIMITS) == etsi014.KeyRequest(1, 256)
    assert read("POST", {"number": ["5"]}, b"  ", LIMITS).number == 5
    assert "not in both" in refused(read, "POST", {"number": ["5"]}, body({}), LIMITS)
    # GET reads the query only, even if a body came along.
    assert read("GET", {}, body({"number": 9}), LIMITS).number == 1


def test_read_key_ids_get_post_and_post_with_query() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    read = etsi014.read_key_ids
    assert read("GET", {"key_ID": [str(a), str(b)]}, b"") == [a, b]
    assert read("POST", {}, body(etsi014.key_ids_body([a, b]))) == [a, b]
    assert read("POST", {"key_ID": [str(a)]}, b"") == [a]
    assert "not in both" in refused(read, "POST", {"key_ID": [str(a)]},
                                    body(etsi014.key_ids_body([a])))
    refused(read, "POST", {}, b"")
