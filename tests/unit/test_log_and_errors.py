"""JSON-lines logging keeps secrets out; the error interceptor maps codes in one place."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from kme import log as kmelog
from kme.errors import ErrorCode, ErrorInterceptor, KmstnError, from_rpc_error
from kme.rpc.v1 import routing_pb2, routing_pb2_grpc
from kme.types import SecretBytes

CANARY = bytes.fromhex("5ec2e7c0ffee5ec2e7c0ffee5ec2e7c0ffee5ec2e7c0ffee5ec2e7c0ffee1234")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    kmelog.configure("test", "N1", "debug", stream)
    yield stream
    logging.getLogger().handlers.clear()


def test_log_lines_are_json_with_context(captured: io.StringIO) -> None:
    log = logging.getLogger("kmstn.test")
    with kmelog.log_context(request_id="r-1", sae_id="SAE1"):
        log.info("took %d keys", 3, extra={"key_id": "k-1"})
    line = json.loads(captured.getvalue())
    assert line["msg"] == "took 3 keys"
    assert (line["service"], line["node"], line["level"]) == ("test", "N1", "info")
    assert (line["request_id"], line["sae_id"], line["key_id"]) == ("r-1", "SAE1", "k-1")


def test_canary_key_bytes_never_reach_the_log(captured: io.StringIO) -> None:
    log = logging.getLogger("kmstn.test")
    secret = SecretBytes(CANARY)
    log.info("key %s", secret)
    log.info("raw %s and %r", CANARY, CANARY)
    log.info("extra", extra={"key": secret, "raw": CANARY, "nested": {"v": [CANARY]}})
    with kmelog.log_context(value=CANARY):
        log.warning("in context")
    try:
        raise KmstnError(ErrorCode.INTERNAL, "boom", cause=f"while handling {secret!r}")
    except KmstnError:
        log.exception("failed")
    text = captured.getvalue()
    for form in (CANARY.hex(), CANARY.hex().upper(), secret.b64(), repr(CANARY)[2:20]):
        assert form not in text
    assert len(text.splitlines()) >= 5


class Servicer(routing_pb2_grpc.RoutingServicer):
    def Route(self, request: routing_pb2.RouteRequest, context: object) -> object:  # noqa: N802
        if request.sae_id == "crash":
            raise RuntimeError("internal detail at 10.0.0.7")
        raise KmstnError(ErrorCode.UNKNOWN_SAE, "unknown SAE 'x'", cause="private detail")


def test_interceptor_maps_errors_and_hides_internals(captured: io.StringIO) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2),
                         interceptors=[ErrorInterceptor(logging.getLogger("kmstn.rpc"))])
    routing_pb2_grpc.add_RoutingServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = routing_pb2_grpc.RoutingStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Route(routing_pb2.RouteRequest(sae_id="x"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            back = from_rpc_error(err.value)
            assert back.code is ErrorCode.UNKNOWN_SAE and back.public == "unknown SAE 'x'"

            with pytest.raises(grpc.RpcError) as err:
                stub.Route(routing_pb2.RouteRequest(sae_id="crash"), timeout=5)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert err.value.details() == "internal error"
            assert from_rpc_error(err.value).code is ErrorCode.INTERNAL
    finally:
        server.stop(0)
    logged = captured.getvalue()
    assert "private detail" in logged  # the cause is kept, privately
    assert "10.0.0.7" in logged


def test_every_error_code_has_a_distinct_member() -> None:
    names = [c.name for c in ErrorCode]
    assert len(names) == len(set(names)) == len(ErrorCode.__members__)
    assert ErrorCode.KEY_NOT_FOUND is not ErrorCode.UNKNOWN_SAE
    assert ErrorCode.KEY_NOT_FOUND.grpc_status == ErrorCode.UNKNOWN_SAE.grpc_status
