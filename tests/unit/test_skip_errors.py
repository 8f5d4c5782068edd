"""The SKIP status table (gateway/errors.py): every error code has a status, and no
failure text leaks what it should not."""

from __future__ import annotations

from gateway.errors import ETSI014_STATUS, SKIP_KEY_NOT_FOUND, SKIP_STATUS, skip_error
from kme.errors import ErrorCode, KmstnError


def test_every_code_has_a_skip_status() -> None:
    assert set(SKIP_STATUS) == set(ErrorCode)
    assert set(SKIP_STATUS.values()) <= {400, 401, 404, 503}
    for code, status in SKIP_STATUS.items():
        if code is not ErrorCode.KEY_NOT_FOUND:
            assert status == ETSI014_STATUS[code], code


def test_messages() -> None:
    assert skip_error(KmstnError(ErrorCode.KEY_NOT_FOUND, "key 1 of sae-x at N7")) == \
        (404, {"message": SKIP_KEY_NOT_FOUND})
    assert skip_error(KmstnError(ErrorCode.INTERNAL, "db path /var/x")) == \
        (503, {"message": "internal error"})
    assert skip_error(KmstnError(ErrorCode.NO_ROUTE, "no path from W to Z", cause="secret")) \
        == (503, {"message": "no path from W to Z"})
