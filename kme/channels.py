"""gRPC channels between a node's own services, and to neighbour relays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import grpc

from kme.config import Endpoint, NodeConfig, TlsFiles
from kme.log import request_id_metadata
from kme.rpcerrors import from_rpc_error

__all__ = ["call", "internal_channel", "mtls_channel"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Reconnect quickly when a neighbour's relay restarts.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# A service of this node behind a unix socket: trying again costs nothing, so
# a restarted service is reached again within half a second.
LOCAL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def mtls_channel(target: str, tls: TlsFiles, server_name: str | None = None) -> grpc.Channel:
    """A TCP channel with mutual TLS using this node's certificate."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    options = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


def endpoint_channel(endpoint: Endpoint, tls: TlsFiles) -> grpc.Channel:
    if endpoint.scheme == "unix":
        return grpc.insecure_channel(endpoint.grpc_target, options=LOCAL_OPTIONS)
    return mtls_channel(endpoint.address, tls)


def internal_channel(
    config: NodeConfig, service: Literal["keyvault", "routing", "relay"]
) -> grpc.Channel:
    """A channel to one of this node's own services, as the node file says."""
    return endpoint_channel(config.endpoint(service), config.tls)


def call(method: Callable[..., _Resp], request: object, timeout: float, *,
         wait_for_ready: bool = True) -> _Resp:
    """Call a unary RPC with a deadline; a failure raises the server's KmstnError.

    By default the call waits, within its deadline, for a channel that is
    reconnecting: a service of this node that restarts costs a short wait,
    not a failed request. Calls to neighbours pass ``wait_for_ready=False``
    and fail at once when the neighbour cannot be reached.

    The request ID of the request being handled travels along as metadata
    (``x-request-id``); the server's interceptor puts it in its log context.
    """
    try:
        return method(request, timeout=timeout, wait_for_ready=wait_for_ready,
                      metadata=request_id_metadata())
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
