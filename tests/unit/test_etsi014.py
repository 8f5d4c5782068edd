"""kme.etsi014: the ETSI GS QKD 014 V1.1.1 message rules, without any transport."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kme import etsi014
from kme.errors import ErrorCode, KmstnError
from kme.etsi014 import Etsi014Error, KeyLimits, KeyRequest
from kme.types import Key, SecretBytes

LIMITS = KeyLimits(key_size=256, min_key_size=64, max_key_size=1024, max_key_per_request=128,
                   max_sae_id_count=2)


def _raises(code: ErrorCode, public: str | None = None) -> Any:
    class _Check:
        def __enter__(self) -> None:
            return None

        def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
            assert isinstance(exc, KmstnError), f"expected KmstnError({code.name}), got {exc!r}"
            assert exc.code is code, (exc.code, exc.public)
            if public is not None:
                assert exc.public == public
            return True

    return _Check()


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# -- limits -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"key_size": 32},  # below min_key_size
    {"key_size": 2048},  # above max_key_size
    {"min_key_size": 0},
    {"max_key_per_request": 0},
    {"max_sae_id_count": -1},
])
def test_limits_refuse_inconsistent_values(kwargs: dict[str, int]) -> None:
    base = {"key_size": 256, "min_key_size": 64, "max_key_size": 1024,
            "max_key_per_request": 128, "max_sae_id_count": 0}
    with pytest.raises(ValueError):
        KeyLimits(**{**base, **kwargs})


# -- GET form of Get key (clause 5.2) ------------------------------------------------------


def test_query_defaults_and_values() -> None:
    assert etsi014.parse_key_request_query({}, LIMITS) == KeyRequest(1, 256)
    assert etsi014.parse_key_request_query({"number": ["5"]}, LIMITS) == KeyRequest(5, 256)
    assert etsi014.parse_key_request_query({"number": ["1"], "size": ["1024"]}, LIMITS) == \
        KeyRequest(1, 1024)
    assert etsi014.parse_key_request_query({"size": [" 64 "]}, LIMITS) == KeyRequest(1, 64)


@pytest.mark.parametrize("args", [
    {"number": ["0"]}, {"number": ["-8"]}, {"number": ["abc"]}, {"number": [""]},
    {"number": ["129"]}, {"number": ["1.0"]}, {"number": ["1", "2"]}, {"number": []},
    {"size": ["0"]}, {"size": ["-8"]}, {"size": ["abc"]}, {"size": ["1032"]}, {"size": ["56"]},
    {"size": ["99999999999999999999"]},
    {"additional_slave_SAE_IDs": ["x"]}, {"extension_mandatory": ["x"]}, {"foo": ["1"]},
])
def test_query_refusals_are_invalid_argument(args: dict[str, list[str]]) -> None:
    with _raises(ErrorCode.INVALID_ARGUMENT):
        etsi014.parse_key_request_query(args, LIMITS)


def test_query_size_not_multiple_of_8_has_the_spec_message() -> None:
    # Clause 4.2: the exact message, even when 17 is also below min_key_size.
    with _raises(ErrorCode.SIZE_NOT_MULTIPLE_OF_8, "size shall be a multiple of 8"):
        etsi014.parse_key_request_query({"size": ["17"]}, LIMITS)


def test_a_kme_serving_bits_accepts_any_size_in_range() -> None:
    bits = KeyLimits(256, 64, 1024, 128, 0, bytes_only=False)
    assert etsi014.parse_key_request_query({"size": ["65"]}, bits).size == 65


# -- POST form of Get key (clause 4.2) --------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"   ", b"{}", b'{"number": null, "size": null}'])
def test_empty_body_means_one_key_of_the_default_size(raw: bytes) -> None:
    assert etsi014.parse_key_request_body(raw, LIMITS) == KeyRequest(1, 256)


def test_full_key_request() -> None:
    req = etsi014.parse_key_request_body(body({
        "number": 3, "size": 512, "additional_slave_SAE_IDs": ["s1", "s2"],
        "extension_optional": [{"abc_hint": 1}, {"abc_more": {"x": [1]}}],
    }), LIMITS)
    assert req == KeyRequest(3, 512, ("s1", "s2"), (),
                             ({"abc_hint": 1}, {"abc_more": {"x": [1]}}))


def test_extension_as_plain_object_is_split_into_pairs() -> None:
    req = etsi014.parse_key_request_body(body({"extension_optional": {"a_x": 1, "a_y": 2}}),
                                         LIMITS)
    assert req.extension_optional == ({"a_x": 1}, {"a_y": 2})
    assert etsi014.extension_names(req.extension_optional) == ["a_x", "a_y"]


@pytest.mark.parametrize("obj", [
    {"number": 0}, {"number": -8}, {"number": "abc"}, {"number": "5"}, {"number": 1.0},
    {"number": True}, {"number": 129}, {"number": [1]},
    {"size": 0}, {"size": -8}, {"size": "abc"}, {"size": 256.0}, {"size": 1032}, {"size": 56},
    {"size": False},
    {"additional_slave_SAE_IDs": []}, {"additional_slave_SAE_IDs": "s1"},
    {"additional_slave_SAE_IDs": [1]}, {"additional_slave_SAE_IDs": ["a/b"]},
    {"additional_slave_SAE_IDs": [""]},
    {"extension_optional": "x"}, {"extension_optional": [1]}, {"extension_mandatory": 5},
    {"extension_optional": [{f"e{i}": i} for i in range(65)]},
    {"numbr": 2}, {"Number": 2},
    [], "x", 5, None,
])
def test_body_refusals_are_invalid_argument(obj: Any) -> None:
    with _raises(ErrorCode.INVALID_ARGUMENT):
        etsi014.parse_key_request_body(body(obj), LIMITS)


@pytest.mark.parametrize("raw", [b"{", b"\xff", b'{"number": 1, "number": 2}',
                                 b"[" * 100_000, b'{"number": NaN}' + b"x"])
def test_malformed_json_is_invalid_argument(raw: bytes) -> None:
    with _raises(ErrorCode.INVALID_ARGUMENT):
        etsi014.parse_key_request_body(raw, LIMITS)


def test_body_size_not_multiple_of_8_has_the_spec_message() -> None:
    with _raises(ErrorCode.SIZE_NOT_MULTIPLE_OF_8, etsi014.MSG_SIZE_NOT_MULTIPLE_OF_8):
        etsi014.parse_key_request_body(body({"size": 17}), LIMITS)


@pytest.mark.parametrize("ext", [[{"abc_route_type": "direct"}], {"abc_route_type": 1},
                                 [{"a_x": 1, "b_y": 2}]])
def test_unsupported_mandatory_extension(ext: Any) -> None:
    with pytest.raises(Etsi014Error) as err:
        etsi014.parse_key_request_body(body({"extension_mandatory": ext}), LIMITS)
    assert err.value.code is ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION
    assert err.value.public == "not all extension_mandatory parameters are supported"
    assert err.value.details
    assert all(set(d) == {"extension_mandatory_unsupported"} for d in err.value.details)


def test_supported_mandatory_extension_is_kept() -> None:
    req = etsi014.parse_key_request_body(
        body({"extension_mandatory": [{"kmstn_route": "x"}]}), LIMITS,
        supported_extensions={"kmstn_route"})
    assert req.extension_mandatory == ({"kmstn_route": "x"},)
    with _raises(ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION):
        etsi014.check_extensions(req)


def test_an_unprintable_field_name_is_not_echoed() -> None:
    with pytest.raises(KmstnError) as err:
        etsi014.parse_key_request_body(body({"x\u0000" * 40: 1}), LIMITS)
    assert "\u0000" not in err.value.public


@given(st.binary(max_size=300))
def test_any_bytes_either_parse_or_raise_a_kmstn_error(raw: bytes) -> None:
    try:
        req = etsi014.parse_key_request_body(raw, LIMITS)
    except KmstnError as exc:
        assert exc.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.SIZE_NOT_MULTIPLE_OF_8,
                            ErrorCode.UNSUPPORTED_MANDATORY_EXTENSION)
    else:
        assert 1 <= req.number <= 128 and 64 <= req.size <= 1024


@given(number=st.integers(1, 128), size=st.integers(8, 128).map(lambda n: n * 8),
       slaves=st.lists(st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True), max_size=3,
                       unique=True),
       optional=st.dictionaries(st.from_regex(r"abc_[a-z]{1,5}", fullmatch=True),
                                st.integers() | st.text(max_size=5), max_size=3))
def test_key_request_round_trips(number: int, size: int, slaves: list[str],
                                 optional: dict[str, Any]) -> None:
    req = KeyRequest(number, size, tuple(slaves), (),
                     tuple({k: v} for k, v in optional.items()))
    assert etsi014.parse_key_request_body(body(etsi014.key_request_body(req)), LIMITS) == req


# -- slaves (spec note 5.7) -------------------------------------------------------------------


def test_check_slaves_accepts_a_sound_set() -> None:
    etsi014.check_slaves("m", "s", KeyRequest(1, 256, ("c", "d")), LIMITS)
    etsi014.check_slaves("m", "s", KeyRequest(), KeyLimits(256, 64, 1024, 128, 0))


@pytest.mark.parametrize(("master", "slave", "extra", "limits", "needle"), [
    ("m", "m", (), LIMITS, "differ"),
    ("m", "", (), LIMITS, "empty"),
    ("m", "  ", (), LIMITS, "empty"),
    ("m", "a/b", (), LIMITS, "URI"),
    ("m", "s", ("c", "c"), LIMITS, "duplicate"),
    ("m", "s", ("m",), LIMITS, "master"),
    ("m", "s", ("s",), LIMITS, "path slave"),
    ("m", "s", ("a", "b", "c"), LIMITS, "more than 2"),
    ("m", "s", ("a",), KeyLimits(256, 64, 1024, 128, 0), "max_SAE_ID_count is 0"),
])
def test_check_slaves_refusals(master: str, slave: str, extra: tuple[str, ...],
                               limits: KeyLimits, needle: str) -> None:
    with pytest.raises(KmstnError) as err:
        etsi014.check_slaves(master, slave, KeyRequest(1, 256, extra), limits)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert needle in err.value.public


# -- key IDs (clause 4.4, 5.3) ---------------------------------------------------------------


def test_key_ids_query_takes_exactly_one() -> None:
    k = uuid.uuid4()
    assert etsi014.parse_key_ids_query({"key_ID": [str(k)]}) == [k]
    assert etsi014.parse_key_ids_query({"key_ID": [str(k).upper()]}) == [k]
    for args in ({}, {"key_ID": []}, {"key_ID": [str(k), str(k)]},
                 {"key_ID": [str(k)], "x": ["1"]}, {"key_ID": ["non-uuid"]}, {"key_ID": [""]}):
        with _raises(ErrorCode.INVALID_ARGUMENT):
            etsi014.parse_key_ids_query(args)


def test_key_ids_body() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert etsi014.parse_key_ids_body(body(etsi014.key_ids_body([a, b]))) == [a, b]
    ext = {"key_IDs": [{"key_ID": str(a), "key_ID_extension": {}}], "key_IDs_extension": {}}
    assert etsi014.parse_key_ids_body(body(ext)) == [a]


@pytest.mark.parametrize("obj", [
    None, {}, [], {"key_IDs": []}, {"key_IDs": {}}, {"key_IDs": ["x"]},
    {"key_IDs": [{"key_ID": "non-uuid"}]}, {"key_IDs": [{"id": "x"}]},
    {"key_IDs": [{"key_ID": "00000000-0000-0000-0000-000000000001", "x": 1}]},
    {"key_IDs": [{"key_ID": "00000000-0000-0000-0000-000000000001"}] * 2},
    {"key_IDs": [{"key_ID": "00000000-0000-0000-0000-000000000001"}], "extra": 1},
])
def test_key_ids_body_refusals(obj: Any) -> None:
    raw = b"" if obj is None else body(obj)
    with _raises(ErrorCode.INVALID_ARGUMENT):
        etsi014.parse_key_ids_body(raw)


def test_key_ids_body_is_bounded() -> None:
    ids = [uuid.uuid4() for _ in range(11)]
    with _raises(ErrorCode.INVALID_ARGUMENT):
        etsi014.parse_key_ids_body(body(etsi014.key_ids_body(ids)), max_ids=10)


# -- rendering and reading answers --------------------------------------------------------------


def _key(size: int = 256) -> Key:
    return Key(uuid.uuid4(), SecretBytes(bytes(range(size // 8))), size)


def test_key_container_round_trip() -> None:
    keys = [_key(), _key(), _key()]
    data = etsi014.key_container(keys)
    assert set(data) == {"keys"}
    assert all(set(k) == {"key_ID", "key"} for k in data["keys"])
    back = etsi014.parse_key_container_body(body(data), number=3, size=256)
    assert [(k.key_id, k.material, k.size_bits) for k in back] == \
        [(k.key_id, k.material, k.size_bits) for k in keys]
    # Without an expected size, the size is the byte length in bits.
    assert etsi014.parse_key_container_body(body(data))[0].size_bits == 256


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("keys"),
    lambda d: d["keys"].append(d["keys"][0]),
    lambda d: d["keys"][0].update(key="***"),
    lambda d: d["keys"][0].update(key=""),
    lambda d: d["keys"][0].update(key_ID="x"),
    lambda d: d["keys"].pop(),
    lambda d: d["keys"][0].update(key="AAAA"),
    lambda d: d["keys"].__setitem__(0, "x"),
])
def test_key_container_checks(mutate: Any) -> None:
    data = etsi014.key_container([_key(), _key()])
    mutate(data)
    with _raises(ErrorCode.INVALID_ARGUMENT):
        etsi014.parse_key_container_body(body(data), number=2, size=256)


def test_status_body_has_the_11_fields_and_reads_back() -> None:
    status = etsi014.Status.of(source_kme_id="K1", target_kme_id="K2", master_sae_id="m",
                               slave_sae_id="s", limits=LIMITS, stored_key_count=5,
                               max_key_count=10)
    data = etsi014.status_body(status)
    assert list(data) == ["source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID",
                          "key_size", "stored_key_count", "max_key_count",
                          "max_key_per_request", "max_key_size", "min_key_size",
                          "max_SAE_ID_count"]
    assert data["max_SAE_ID_count"] == 2 and data["key_size"] == 256
    assert etsi014.parse_status_body(body(data)) == status
    assert status.limits == LIMITS
    for name, bad in (("key_size", "256"), ("stored_key_count", True), ("min_key_size", -1),
                      ("source_KME_ID", 1)):
        with _raises(ErrorCode.INVALID_ARGUMENT):
            etsi014.parse_status_body(body({**data, name: bad}))
    with _raises(ErrorCode.INVALID_ARGUMENT):
        etsi014.parse_status_body(body({k: v for k, v in data.items() if k != "slave_SAE_ID"}))


def test_error_body() -> None:
    assert etsi014.error_body("m") == {"message": "m"}
    assert etsi014.error_body("m", [{"a": 1}]) == {"message": "m", "details": [{"a": 1}]}
    assert etsi014.parse_error_body(body({"message": "m", "details": [{"a": 1}, 2]})) == \
        ("m", ({"a": 1},))
    for raw in (b"", b"oops", b"[1]", body({"message": 5})):
        assert etsi014.parse_error_body(raw)[0] is None


def test_spec_messages_are_exact() -> None:
    assert etsi014.MSG_SIZE_NOT_MULTIPLE_OF_8 == "size shall be a multiple of 8"
    assert etsi014.MSG_KEYS_NOT_FOUND == "one or more keys specified are not found on KME"
    assert etsi014.MSG_EXT_MANDATORY_UNSUPPORTED == \
        "not all extension_mandatory parameters are supported"
    assert etsi014.MSG_EXT_MANDATORY_UNMET == \
        "not all extension_mandatory request options could be met"
    assert etsi014.MSG_EXT_OPTIONAL_UNHANDLED == \
        "not all extension_optional request options handled"
    err = etsi014.keys_not_found(cause="private")
    assert (err.code, err.public, err.cause) == (ErrorCode.KEY_NOT_FOUND,
                                                 etsi014.MSG_KEYS_NOT_FOUND, "private")
    assert etsi014.insufficient_key().code is ErrorCode.INSUFFICIENT_KEY
    assert etsi014.permission_denied().code is ErrorCode.PERMISSION_DENIED
