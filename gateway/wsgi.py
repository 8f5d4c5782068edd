"""The WSGI side of a request the edge has already read: its environ, and its answer in one write.

The front loop (gateway/edge.py) reads, frames and checks every request
(gateway/http1.py) before a worker sees it. Handing that request's bytes to
Gunicorn's parser only to parse them a second time, and writing the answer
as a header record and then a body record, cost the ETSI 014 worker about
0.6 ms of a 2 ms request on a small machine (tests/perf/stagetrace: the
parse 0.23 ms, the environ and the two writes most of the rest). So the
014 worker builds the PEP 3333 environ from the checked request and sends
the whole answer with one ``sendall``; Gunicorn still runs the processes
(arbiter, workers, signals).

What the environ and the answer keep from Gunicorn's: header fields become
``HTTP_*`` keys (repeats joined with ","; Content-Type and Content-Length as
CGI keys), PATH_INFO is the percent-decoded path as latin-1, the status line
echoes the request's HTTP version, every answer carries ``Date``,
``Connection`` and a ``Content-Length``, hop-by-hop headers from the
application are dropped and a response header that is not a token or whose
value holds a control character is refused (no response splitting). No
``Server`` banner is sent. Field names with "_" never get here (the edge
refuses them), so no header can pose as a CGI key.
"""

from __future__ import annotations

import email.utils
import io
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from gateway.http1 import Request

__all__ = ["Answer", "environ_for"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_STATUS = re.compile(r"[1-9][0-9]{2} [^\r\n]*")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                         "proxy-authorization", "te", "trailers", "transfer-encoding",
                         "upgrade"})
_CGI_KEYS = {b"content-type": "CONTENT_TYPE", b"content-length": "CONTENT_LENGTH"}

_date_second = -1
_date_value = ""


def _http_date() -> str:
    """RFC 9110 IMF-fixdate of now, formatted once per second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_value = email.utils.formatdate(now, usegmt=True)
        _date_second = now
    return _date_value


def environ_for(request: Request, sock: Any, peer: tuple[Any, ...], server: tuple[Any, ...],
                multiprocess: bool) -> dict[str, Any]:
    """The PEP 3333 environ of one checked request on ``sock`` (the TLS socket of a TCP
    listener: ``peer`` and ``server`` are socket addresses)."""
    path, _, query = request.target.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query,
        "RAW_URI": request.target,
        "SERVER_PROTOCOL": request.version,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https",
        "wsgi.input": io.BytesIO(request.body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        # gateway/auth.py reads the client certificate from the socket.
        "gunicorn.socket": sock,
    }
    repeated: dict[str, list[str]] = {}
    for name, raw in request.fields:
        value = raw.decode("latin-1")
        key = _CGI_KEYS.get(name) or "HTTP_" + name.decode("ascii").upper().replace("-", "_")
        if key in environ:
            repeated.setdefault(key, [environ[key]]).append(value)
        else:
            environ[key] = value
    for key, values in repeated.items():
        environ[key] = ",".join(values)
    environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = peer[0], str(peer[1])
    environ["SERVER_NAME"], environ["SERVER_PORT"] = server[0], str(server[1])
    return environ


class Answer:
    """Collects one WSGI answer (``start_response``, then the body) and renders it whole."""

    def __init__(self, version: str) -> None:
        self._version = version
        self.status = ""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []

    def start_response(self, status: str, headers: Iterable[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if self.status and exc_info is None:
            raise AssertionError("start_response called twice without exc_info")
        if not isinstance(status, str) or not _STATUS.fullmatch(status):
            raise ValueError(f"invalid status {status!r}")
        kept = []
        for name, value in headers:
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise ValueError(f"invalid response header name {name!r}")
            if not isinstance(value, str) or not _VALUE.fullmatch(value):
                # Name only: the value may carry sensitive data.
                raise ValueError(f"invalid value of response header {name!r}")
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower == "content-length":
                continue  # framing is ours; the length is counted below
            kept.append((name, value.strip(" \t")))
        self.status, self._headers, self._body = status, kept, []
        return self.write

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"{type(data).__name__} is not bytes")
        self._body.append(data)

    def render(self, keep_alive: bool) -> bytes:
        """Status line, headers and body: the bytes of one ``sendall``."""
        code = int(self.status[:3])
        body = b"".join(self._body)
        lines = [f"HTTP/{self._version[5:]} {self.status}",
                 f"Date: {_http_date()}",
                 f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        lines += [f"{name}: {value}" for name, value in self._headers]
        if code in (204, 304) or code < 200:
            body = b""  # RFC 9110 6.4.1: these carry no content
        else:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
