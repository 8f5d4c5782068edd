"""kme.flows status (ETSI 014 clause 4.1) for pollers: complete, cheap, bounded (issue 14).

Uses the fake federation of tests/unit/test_flows.py (real RoutingTable, fake
devices); the device in front of N0's QKD link is wrapped to count and steer
its status answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from kme.errors import ErrorCode, KmstnError
from kme.types import NodeId
from tests.unit.test_flows import FakeDevice, FakeDevices, Federation, Node


class SteeredDevices:
    """N0's devices, with a status that answers ``stored`` (or fails) and counts calls."""

    def __init__(self, inner: FakeDevices) -> None:
        self.inner = inner
        self.stored = 10
        self.fail = False
        self.calls = 0

    def toward(self, peer: NodeId) -> FakeDevice | None:
        return self.inner.toward(peer)

    def for_link(self, link_id: str) -> Any:
        device = self.inner.for_link(link_id)
        outer = self

        class Steered:
            link = device.link
            enc_keys = device.enc_keys
            dec_keys = device.dec_keys

            def status(self) -> Any:
                outer.calls += 1
                if outer.fail:
                    raise KmstnError(ErrorCode.TIMEOUT, "device did not answer")
                return SimpleNamespace(stored_key_count=outer.stored)

        return Steered()


@pytest.fixture
def line() -> Iterator[tuple[Federation, Node, SteeredDevices]]:
    fed = Federation(["qkd", "pqc", "qkd"])
    flows = fed.flows[NodeId("N0")]
    devices = SteeredDevices(flows.devices)  # type: ignore[arg-type]
    flows.devices = devices
    yield fed, flows, devices
    fed.close()


FIELDS = {"source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size",
          "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
          "min_key_size", "max_SAE_ID_count"}


def test_status_reads_the_device_and_never_exceeds_max_key_count(line: Any) -> None:
    _, flows, devices = line
    body = flows.status("S0", "S3")
    assert set(body) == FIELDS and body["stored_key_count"] == 10
    devices.stored = body["max_key_count"] + 5  # a device that counts more than we offer
    flows.STATUS_MAX_AGE_S = 0.0  # read the device every time
    assert flows.status("S0", "S3")["stored_key_count"] == body["max_key_count"]


def test_status_is_read_from_the_device_at_most_once_a_second(line: Any) -> None:
    _, flows, devices = line
    flows.STATUS_MAX_AGE_S = 3600.0  # no clock in this test: a loaded machine is slow
    for _ in range(20):
        flows.status("S0", "S3")
    assert devices.calls == 1


def test_a_draw_forgets_the_count(line: Any) -> None:
    """After this node's own enc_keys, status reads the device again (exact counts)."""
    _, flows, devices = line
    flows.STATUS_MAX_AGE_S = 3600.0
    flows.status("S0", "S3")
    flows.enc_keys("S0", "S3", 2, 256)
    devices.stored = 8
    assert flows.status("S0", "S3")["stored_key_count"] == 8
    assert devices.calls == 2


def test_a_silent_device_shows_as_no_keys(line: Any) -> None:
    _, flows, devices = line
    devices.fail = True
    body = flows.status("S0", "S3")
    assert set(body) == FIELDS and body["stored_key_count"] == 0


def test_no_route_shows_as_no_keys_and_enc_keys_still_refuses(line: Any) -> None:
    fed, flows, _ = line
    up = flows.status("S0", "S3")
    flows.routing.set_link_state("P1", False)
    down = flows.status("S0", "S3")
    assert down["stored_key_count"] == 0
    assert {k: v for k, v in down.items() if k != "stored_key_count"} == \
        {k: v for k, v in up.items() if k != "stored_key_count"}
    drawn = fed.shared["Q0"].drawn
    with pytest.raises(KmstnError) as err:
        flows.enc_keys("S0", "S3", 1, 256)
    assert err.value.code is ErrorCode.NO_ROUTE
    assert fed.shared["Q0"].drawn == drawn  # refused before any key was taken
    # The QKD neighbour needs no route: its count is the device's.
    assert flows.status("S0", "S1")["stored_key_count"] == 10


def test_client_errors_are_still_errors(line: Any) -> None:
    _, flows, _ = line
    with pytest.raises(KmstnError) as err:
        flows.status("S0", "S0")
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(KmstnError) as err:
        flows.status("S3", "S0")  # a master this node does not serve
    assert err.value.code is ErrorCode.PERMISSION_DENIED
