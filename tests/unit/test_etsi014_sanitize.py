"""kme.qkd.sanitize: the sanitizing proxy of paper IV-A.1, as pure logic."""

from __future__ import annotations

from kme import etsi014
from kme.etsi014 import KeyRequest
from kme.qkd import OverlayFields, sanitize


def test_overlay_fields_are_kept_back_from_the_device() -> None:
    req = KeyRequest(
        number=3, size=512, additional_slave_sae_ids=("far-1", "far-2"),
        extension_mandatory=({"kmstn_route": "qkd-only"}, {"abc_mode": "x"}),
        extension_optional=({"kmstn_hint": 1, "abc_hint": 2},),
    )
    device_req, overlay = sanitize(req)
    assert device_req == KeyRequest(3, 512, (), ({"abc_mode": "x"},), ({"abc_hint": 2},))
    assert overlay == OverlayFields(("far-1", "far-2"), ({"kmstn_route": "qkd-only"},),
                                    ({"kmstn_hint": 1},))
    # What reaches the device is a plain Key request a point-to-point KME
    # with max_SAE_ID_count 0 accepts (the abc_ extensions are the device's
    # business: it answers them itself).
    limits = etsi014.KeyLimits(256, 64, 1024, 128, 0)
    etsi014.check_slaves("A", "B", device_req, limits)
    body = etsi014.key_request_body(device_req)
    assert "additional_slave_SAE_IDs" not in body
    assert "kmstn" not in repr(body)


def test_a_plain_request_passes_unchanged() -> None:
    req = KeyRequest(number=2, size=256)
    device_req, overlay = sanitize(req)
    assert device_req == req
    assert overlay == OverlayFields()
