"""Issue 11: Retry-After travels from the relay (gRPC trailing metadata) to the 014 answer."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pytest

from gateway.errors import ETSI014_STATUS, etsi014_error, etsi014_headers, etsi020_problem
from kme.errors import ErrorCode, ErrorInterceptor, KmstnError, from_rpc_error
from kme.rpc.v1 import routing_pb2, routing_pb2_grpc


class Servicer(routing_pb2_grpc.RoutingServicer):
    def Route(self, request: routing_pb2.RouteRequest,  # noqa: N802
              context: grpc.ServicerContext) -> routing_pb2.RouteResponse:
        if request.sae_id == "quota":
            raise KmstnError(ErrorCode.OVER_QUOTA, "SAE 'quota' is over its key quota",
                             reason="over_quota", retry_after_s=7)
        raise KmstnError(ErrorCode.INSUFFICIENT_KEY, "not enough key")


def test_retry_after_crosses_grpc_with_the_code() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2),
                         interceptors=[ErrorInterceptor(logging.getLogger("kmstn.rpc"))])
    routing_pb2_grpc.add_RoutingServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = routing_pb2_grpc.RoutingStub(ch)
            for sae, code, after in (("quota", ErrorCode.OVER_QUOTA, 7),
                                     ("other", ErrorCode.INSUFFICIENT_KEY, None)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Route(routing_pb2.RouteRequest(sae_id=sae), timeout=5)
                back = from_rpc_error(err.value)
                assert (back.code, back.retry_after_s) == (code, after)
    finally:
        server.stop(0)


def test_over_quota_is_a_503_with_retry_after_and_a_clear_message() -> None:
    exc = KmstnError(ErrorCode.OVER_QUOTA, "SAE 'a' is over its key quota of 1000 bits/s; "
                     "retry in 3 s", retry_after_s=3)
    status, body = etsi014_error(exc)
    assert status == 503 and "quota" in body["message"]
    assert etsi014_headers(exc) == {"Retry-After": "3"}
    # ETSI 014 has 200/400/401/503 only; every code maps to one of them.
    assert set(ETSI014_STATUS.values()) <= {400, 401, 503}
    assert set(ETSI014_STATUS) == set(ErrorCode)
    assert etsi020_problem(exc)[0] == 503
    # No Retry-After where the error says nothing of when to come back, or on a 400.
    assert etsi014_headers(KmstnError(ErrorCode.INSUFFICIENT_KEY, "x")) == {}
    assert etsi014_headers(KmstnError(ErrorCode.INVALID_ARGUMENT, "x", retry_after_s=2)) == {}
