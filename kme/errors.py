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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from kme.rpcerrors import ErrorInterceptor, from_rpc_error

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
    """What went wrong, independent of transport. Value = the gRPC status's name."""

    # The request is malformed or violates a documented limit.
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    # ETSI 014 4.2: a bytes-only KME got a size that is not a multiple of 8.
    SIZE_NOT_MULTIPLE_OF_8 = "INVALID_ARGUMENT"
    # An extension_mandatory entry this node does not implement.
    UNSUPPORTED_MANDATORY_EXTENSION = "UNIMPLEMENTED"
    # An extension_mandatory entry that is known but cannot be satisfied.
    UNSATISFIED_MANDATORY_EXTENSION = "FAILED_PRECONDITION"
    # An SAE ID that no KMSTN in the topology serves.
    UNKNOWN_SAE = "NOT_FOUND"
    # A node or link ID that the topology does not have.
    UNKNOWN_NODE = "NOT_FOUND"
    # One or more key IDs are not held here (or not for that master).
    KEY_NOT_FOUND = "NOT_FOUND"
    # A key ID already exists with other bytes, or was taken or voided.
    KEY_CONFLICT = "ALREADY_EXISTS"
    # The caller is authenticated but not allowed (e.g. not a named slave).
    PERMISSION_DENIED = "PERMISSION_DENIED"
    # The caller could not be authenticated.
    UNAUTHENTICATED = "UNAUTHENTICATED"
    # Too little key material stored to satisfy a valid request.
    INSUFFICIENT_KEY = "RESOURCE_EXHAUSTED"
    # The SAE (or SAE pair) has used its key quota for now (issue 11).
    OVER_QUOTA = "RESOURCE_EXHAUSTED"
    # No path to the destination with the links that are up.
    NO_ROUTE = "UNAVAILABLE"
    # The route would send the key straight back to the node it came from.
    INVALID_ROUTING = "FAILED_PRECONDITION"
    # A neighbour, device or internal service did not answer usefully.
    UNAVAILABLE = "UNAVAILABLE"
    # Something took longer than its deadline.
    TIMEOUT = "DEADLINE_EXCEEDED"
    # An envelope failed authentication (IV, ciphertext, tag, header).
    TAMPERED = "INVALID_ARGUMENT"
    # An envelope names a KEM session that is unknown, expired or used.
    UNKNOWN_SESSION = "FAILED_PRECONDITION"
    # The key store is sealed (its database key could not be unsealed).
    SEALED = "UNAVAILABLE"
    # A bug or an unexpected failure; details go to the private log only.
    INTERNAL = "INTERNAL"

    # Several names share a gRPC status, so enum aliasing must be avoided:
    # give each member a distinct value while keeping the status reachable.
    def __new__(cls, status: str) -> ErrorCode:
        obj = object.__new__(cls)
        obj._value_ = (len(cls.__members__), status)
        return obj

    @property
    def grpc_status(self) -> grpc.StatusCode:
        # Imported here, not at the top: this module is the base of every
        # kmstn process, and the 014 listener's Gunicorn arbiter, which
        # speaks no gRPC, then does not carry the gRPC runtime (about 15 MB).
        import grpc

        return grpc.StatusCode[self.value[1]]


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


def __getattr__(name: str) -> Any:
    """``ErrorInterceptor`` and ``from_rpc_error`` live in kme.rpcerrors (they need gRPC);
    importing them from here still works, without loading gRPC for every process."""
    if name in ("ErrorInterceptor", "from_rpc_error"):
        from kme import rpcerrors

        return getattr(rpcerrors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
