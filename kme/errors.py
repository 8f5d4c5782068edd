"""The one ErrorCode enum of kmstn and its one table to gRPC status codes.

Exception tree::

    KmstnError            every expected failure; carries an ErrorCode,
    |                     a public message and an optional private cause
    +-- ConfigError       (kme.config) a bad configuration file; exit 78

A ``KmstnError`` has two texts. ``public`` is safe to send to a peer or an
SAE: it never holds key bytes, internal addresses or stack detail. ``cause``
is for the private log only. The HTTP side (ETSI status codes) is decided in
``gateway/errors.py``, from the same ErrorCode, and nowhere else.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any

import grpc

__all__ = [
    "ERROR_CODE_METADATA_KEY",
    "ERROR_REASON_METADATA_KEY",
    "RETRY_AFTER_METADATA_KEY",
    "ErrorCode",
    "ErrorInterceptor",
    "KmstnError",
    "from_rpc_error",
]

ERROR_CODE_METADATA_KEY = "kmstn-error-code"
ERROR_REASON_METADATA_KEY = "kmstn-error-reason"
# Seconds after which the request may succeed (over quota, key still scarce):
# the 014 gateway answers it as the HTTP Retry-After header.
RETRY_AFTER_METADATA_KEY = "kmstn-retry-after-s"


class ErrorCode(enum.Enum):
    """What went wrong, independent of transport. Value = gRPC status."""

    # The request is malformed or violates a documented limit.
    INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
    # ETSI 014 4.2: a bytes-only KME got a size that is not a multiple of 8.
    SIZE_NOT_MULTIPLE_OF_8 = grpc.StatusCode.INVALID_ARGUMENT
    # An extension_mandatory entry this node does not implement.
    UNSUPPORTED_MANDATORY_EXTENSION = grpc.StatusCode.UNIMPLEMENTED
    # An extension_mandatory entry that is known but cannot be satisfied.
    UNSATISFIED_MANDATORY_EXTENSION = grpc.StatusCode.FAILED_PRECONDITION
    # An SAE ID that no KMSTN in the topology serves.
    UNKNOWN_SAE = grpc.StatusCode.NOT_FOUND
    # A node or link ID that the topology does not have.
    UNKNOWN_NODE = grpc.StatusCode.NOT_FOUND
    # One or more key IDs are not held here (or not for that master).
    KEY_NOT_FOUND = grpc.StatusCode.NOT_FOUND
    # A key ID already exists with other bytes, or was taken or voided.
    KEY_CONFLICT = grpc.StatusCode.ALREADY_EXISTS
    # The caller is authenticated but not allowed (e.g. not a named slave).
    PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
    # The caller could not be authenticated.
    UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
    # Too little key material stored to satisfy a valid request.
    INSUFFICIENT_KEY = grpc.StatusCode.RESOURCE_EXHAUSTED
    # The SAE (or SAE pair) has used its key quota for now (issue 11).
    OVER_QUOTA = grpc.StatusCode.RESOURCE_EXHAUSTED
    # No path to the destination with the links that are up.
    NO_ROUTE = grpc.StatusCode.UNAVAILABLE
    # The route would send the key straight back to the node it came from.
    INVALID_ROUTING = grpc.StatusCode.FAILED_PRECONDITION
    # A neighbour, device or internal service did not answer usefully.
    UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
    # Something took longer than its deadline.
    TIMEOUT = grpc.StatusCode.DEADLINE_EXCEEDED
    # An envelope failed authentication (IV, ciphertext, tag, header).
    TAMPERED = grpc.StatusCode.INVALID_ARGUMENT
    # An envelope names a KEM session that is unknown, expired or used.
    UNKNOWN_SESSION = grpc.StatusCode.FAILED_PRECONDITION
    # The key store is sealed (its database key could not be unsealed).
    SEALED = grpc.StatusCode.UNAVAILABLE
    # A bug or an unexpected failure; details go to the private log only.
    INTERNAL = grpc.StatusCode.INTERNAL

    # Several names share a gRPC status, so enum aliasing must be avoided:
    # give each member a distinct value while keeping the status reachable.
    def __new__(cls, status: grpc.StatusCode) -> ErrorCode:
        obj = object.__new__(cls)
        obj._value_ = (len(cls.__members__), status)
        return obj

    @property
    def grpc_status(self) -> grpc.StatusCode:
        status: grpc.StatusCode = self.value[1]
        return status


class KmstnError(Exception):
    """An expected failure with a public message and a private cause.

    ``reason`` is an optional machine-readable refinement of the code (for
    example ``missing_parameters`` or ``no_known_route``): the ETSI 020 layer
    uses it as the problem-details key, and it travels across gRPC with the
    code. ``retry_after_s``: when the request may succeed if sent again (key
    scarce, quota used up); it travels too and becomes ``Retry-After``.
    """

    def __init__(self, code: ErrorCode, public: str, *, cause: str | None = None,
                 reason: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(public)
        self.code = code
        self.public = public
        self.cause = cause
        self.reason = reason
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"KmstnError({self.code.name}, {self.public!r})"


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
