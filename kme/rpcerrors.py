"""The gRPC side of kmstn's errors: the one table from ErrorCode to gRPC status
(``ErrorCode.grpc_status``) applied to servers (:class:`ErrorInterceptor`) and
clients (:func:`from_rpc_error`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from kme.errors import (
    ERROR_CODE_METADATA_KEY,
    ERROR_REASON_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    ErrorCode,
    KmstnError,
)

__all__ = ["ErrorInterceptor", "from_rpc_error"]


def from_rpc_error(err: grpc.RpcError) -> KmstnError:
    """Turn a failed gRPC call back into the KmstnError the server raised."""
    code: ErrorCode | None = None
    reason: str | None = None
    retry_after: int | None = None
    trailing: Any = getattr(err, "trailing_metadata", lambda: None)() or ()
    for key, value in trailing:
        if key == ERROR_CODE_METADATA_KEY and value in ErrorCode.__members__:
            code = ErrorCode[value]
        elif key == ERROR_REASON_METADATA_KEY:
            reason = str(value)
        elif key == RETRY_AFTER_METADATA_KEY and str(value).isdigit():
            retry_after = int(value)
    status: Any = getattr(err, "code", lambda: None)()
    details: Any = getattr(err, "details", lambda: None)()
    if code is None:
        if status == grpc.StatusCode.DEADLINE_EXCEEDED:
            code = ErrorCode.TIMEOUT
        elif status == grpc.StatusCode.UNAVAILABLE:
            code = ErrorCode.UNAVAILABLE
        else:
            code = next(
                (c for c in ErrorCode if c.grpc_status == status), ErrorCode.INTERNAL
            )
        # Transport failures carry library text; keep it private.
        return KmstnError(code, "internal service unavailable", cause=str(details))
    return KmstnError(code, str(details or code.name), reason=reason,
                      retry_after_s=retry_after)


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Map exceptions raised by servicers to gRPC status codes, in one place.

    ``KmstnError`` becomes its ErrorCode's status with the public message and
    the code name in trailing metadata; any other exception becomes INTERNAL
    with a fixed message, and its traceback goes to the private log.
    """

    def __init__(self, log: logging.Logger) -> None:
        self._log = log

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method
        log = self._log

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return inner(request, context)
            except KmstnError as exc:
                if exc.cause:
                    log.info("rpc failed", extra={"rpc": method, "error_code": exc.code.name,
                                                  "cause": exc.cause})
                metadata = [(ERROR_CODE_METADATA_KEY, exc.code.name)]
                if exc.reason:
                    metadata.append((ERROR_REASON_METADATA_KEY, exc.reason))
                if exc.retry_after_s is not None:
                    metadata.append((RETRY_AFTER_METADATA_KEY, str(exc.retry_after_s)))
                context.set_trailing_metadata(tuple(metadata))
                context.abort(exc.code.grpc_status, exc.public)
            except Exception:
                # Servicers raise KmstnError and never call context.abort
                # themselves, so anything else here is a bug.
                log.exception("rpc crashed", extra={"rpc": method})
                context.set_trailing_metadata(
                    ((ERROR_CODE_METADATA_KEY, ErrorCode.INTERNAL.name),)
                )
                context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
