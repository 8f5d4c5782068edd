"""Read the JSON-lines logs a lab federation writes (``DIR/logs/*.log``).

Two uses: where each service's metrics listener ended up (the launcher
starts them on ephemeral ports and writes the URLs into federation.json),
and the path of one key through the federation (``kmstn trace``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LogLine", "metrics_url", "read_logs", "trace_key"]


@dataclass(frozen=True, slots=True)
class LogLine:
    file: str
    record: dict[str, Any]

    @property
    def ts(self) -> str:
        return str(self.record.get("ts", ""))


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        if not line.startswith("{"):
            continue  # a library's own output (Gunicorn's arbiter), not ours
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def read_logs(logs_dir: Path) -> Iterator[LogLine]:
    for path in sorted(logs_dir.glob("*.log")):
        for record in _lines(path):
            yield LogLine(path.name, record)


def metrics_url(log: Path) -> str | None:
    """The URL of the last metrics listener a service logged (the current process's)."""
    url = None
    for record in _lines(log):
        if record.get("msg") == "metrics listening" and isinstance(record.get("metrics_url"),
                                                                   str):
            url = record["metrics_url"]
    return url


def _mentions(value: Any, needle: str) -> bool:
    if isinstance(value, str):
        return needle in value
    if isinstance(value, list):
        return any(_mentions(v, needle) for v in value)
    if isinstance(value, dict):
        return any(_mentions(v, needle) for v in value.values())
    return False


def trace_key(logs_dir: Path, key_id: str) -> list[LogLine]:
    """Every log line of the requests that handled ``key_id``, in time order.

    A line belongs to the key's path if it names the key, or if it carries
    the request ID of a line that names it: the ID made at the edge travels
    in gRPC metadata (and in the 020 header toward neighbours), so the
    services' lines of one request share it even where they do not repeat
    the key ID.
    """
    lines = list(read_logs(logs_dir))
    needle = key_id.lower()
    direct = [ln for ln in lines if _mentions(ln.record, needle)]
    request_ids = {str(ln.record["request_id"]) for ln in direct if ln.record.get("request_id")}
    named = {id(ln) for ln in direct}
    picked = [ln for ln in lines if id(ln) in named or
              str(ln.record.get("request_id", "")) in request_ids]
    return sorted(picked, key=lambda ln: ln.ts)
