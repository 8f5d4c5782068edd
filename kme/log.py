"""JSON-lines logging for journald: one object per line on stdout.

Every line carries ``ts``, ``level``, ``service``, ``node`` and ``msg``, plus
the request context set with :func:`log_context` (``request_id``,
``sae_id``, ``key_id``, ...) and any ``extra`` fields of the call.

Key bytes, KEM secrets and database keys must never reach a log call. As a
second line of defence, values are rendered with ``repr`` only for types we
know (str, numbers, bools, None, lists/dicts of those); anything else,
including :class:`kme.types.SecretBytes` and ``bytes``, is replaced by its
type name, so a secret passed by mistake prints as ``<bytes>``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = [
    "REQUEST_ID_HEADER",
    "REQUEST_ID_METADATA_KEY",
    "JsonFormatter",
    "adopt_request_id",
    "configure",
    "current_request_id",
    "get_logger",
    "log_context",
    "request_id_headers",
    "request_id_metadata",
]

# The request ID made at the edge (or adopted from a caller) travels with the
# request: as gRPC metadata between a node's services, as this HTTP header
# on ETSI 014/020 requests and answers, and in the sealed envelope's header.
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_METADATA_KEY = "x-request-id"
_REQUEST_ID_MAX = 64
_REQUEST_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._:")

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "kmstn_log_context", default={}  # noqa: B039 - never mutated, always replaced
)

# Attributes every LogRecord has; anything else on a record came from extra=.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _safe(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        return [_safe(v, depth + 1) for v in value]
    if depth < 3 and isinstance(value, dict):
        return {str(k): _safe(v, depth + 1) for k, v in value.items()}
    if type(value).__name__ in {"UUID", "Path", "PosixPath", "ErrorCode"}:
        return str(value)
    return f"<{type(value).__name__}>"


def _message(record: logging.LogRecord) -> str:
    msg = str(record.msg)
    if not record.args:
        return msg
    args = record.args if isinstance(record.args, tuple) else (record.args,)
    try:
        return msg % tuple(_safe(a) for a in args)
    except (TypeError, ValueError):
        return msg


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, node: str) -> None:
        super().__init__()
        self._service = service
        self._node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "service": self._service,
            "node": self._node,
            "msg": _message(record),
        }
        out.update(_context.get())
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = _safe(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=lambda v: f"<{type(v).__name__}>")


def configure(service: str, node: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Send all logging to ``stream`` (stdout) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(service, node))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library chatter at INFO (werkzeug request lines, grpc) is not ours.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Python's own warnings and uncaught exceptions would otherwise reach
    # stderr as plain text: every line a process writes is JSON.
    logging.captureWarnings(True)
    crash = logging.getLogger("kmstn.crash")

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        crash.critical("uncaught exception", exc_info=(kind, value, tb))

    def thread_excepthook(args: Any) -> None:
        if args.exc_type is not SystemExit and args.exc_value is not None:
            crash.critical("uncaught exception in a thread", exc_info=(
                args.exc_type, args.exc_value, args.exc_traceback),
                extra={"thread": getattr(args.thread, "name", None)})

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (request_id, sae_id, key_id, ...) to every line logged inside."""
    merged = {**_context.get(), **{k: _safe(v) for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def adopt_request_id(value: object) -> str | None:
    """A request ID received from outside (header, metadata, envelope), or None.

    It came from a client or a neighbour and goes into logs and on to other
    nodes, so only short IDs of URL-safe characters are taken; anything else
    is dropped (the caller then makes a fresh ID).
    """
    if not isinstance(value, str) or not 0 < len(value) <= _REQUEST_ID_MAX:
        return None
    return value if _REQUEST_ID_CHARS.issuperset(value) else None


def current_request_id() -> str | None:
    """The request ID of the request being handled in this context, if any."""
    value = _context.get().get("request_id")
    return value if isinstance(value, str) else None


def request_id_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current request ID (empty if there is none)."""
    rid = current_request_id()
    return ((REQUEST_ID_METADATA_KEY, rid),) if rid else ()


def request_id_headers() -> dict[str, str]:
    """HTTP headers carrying the current request ID, for an ETSI 020 request to a
    neighbour (its 020 listener adopts it, so the key's path shares one ID)."""
    rid = current_request_id()
    return {REQUEST_ID_HEADER: rid} if rid else {}
