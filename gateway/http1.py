"""HTTP/1.1 request framing at the edge (RFC 9112), before any request worker sees a byte.

The edge (gateway/edge.py) reads every request off the wire itself and hands
a worker only a complete one. :class:`RequestReader` is its parser: it is
fed bytes as they arrive, finds where a request ends, checks the message
framing strictly, and returns the request both taken apart (its fields and
body, from which the ETSI 014 worker builds its WSGI environ: gateway/wsgi.py)
and as one byte string that cheroot, behind the ETSI 020 edge, parses again
without ever waiting on the network. Nothing here does I/O or logs.

Because it decides where each request ends, this reader is stricter than
the servers behind it: whatever they might read differently is refused here
(request smuggling needs two parsers that disagree). Refused, as
:class:`Refused` with a public message, are:

- anything but ``METHOD SP request-target SP HTTP/1.1`` (or ``HTTP/1.0``)
  as the request line: HTTP/0.9, other versions, garbage; and methods other
  than GET and POST, the only ones ETSI GS QKD 014 and 020 use;
- a request target that is not origin-form, or an absolute-form naming
  another host (RFC 9112 3.2.2: one naming this listener is rewritten to
  origin-form, its authority becoming the Host);
- bare CR or LF, obsolete line folding, malformed field lines, control
  characters in field values, and field names with ``_`` (WSGI maps ``-``
  and ``_`` to the same environ key);
- an HTTP/1.1 request without exactly one Host (RFC 9112 3.2);
- Content-Length together with Transfer-Encoding, more than one of either,
  a Content-Length that is not 1-19 digits, any transfer coding but
  ``chunked``, chunked on HTTP/1.0, an Expect other than ``100-continue``;
- a malformed chunked body, and a body (chunked or not) larger than the
  limit: refused, never cut;
- a request line, field line, header section or field count over the
  limits of :class:`Limits`.

A chunked body is decoded here and passed on with a Content-Length (its
trailer fields are dropped, RFC 9112 7.1.2); ``Expect`` is answered by the
edge and not passed on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["ALLOWED_METHODS", "Limits", "Refused", "Request", "RequestReader"]

ALLOWED_METHODS: Final = frozenset({"GET", "POST"})

# RFC 9110 5.6.2: tchar.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 5.5: a field value holds no control character other than HTAB.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 3.2 / RFC 3986 3.2: host [ ":" port ], IP literals in brackets.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{0,5})?")
_DIGITS = re.compile(rb"[0-9]{1,19}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_CRLF: Final = b"\r\n"


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may be. Every limit is stated in the served OpenAPI documents."""

    max_request_line: int = 8192
    max_field_line: int = 8192
    max_header_bytes: int = 32_768  # all field lines of the head together
    max_fields: int = 64
    max_body: int = 4 * 1024 * 1024  # decoded body, chunked or not
    max_chunk_line: int = 1024  # a chunk-size line with its extensions


class Refused(Exception):  # noqa: N818 - a refusal, not an error of ours
    """The edge refuses this request; ``message`` is public, ``timeout`` marks a stall."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class Request:
    """One complete, checked request, as the bytes to hand the server behind the edge."""

    method: str
    target: str
    version: str
    wire: bytes
    close: bool  # the client asked for the connection to close after this request
    # The same request already taken apart, for a server that needs no second
    # parse (gateway/wsgi.py): the field lines passed on, as (lower-case name,
    # value) in order, and the body (chunked coding removed; ``wire`` then
    # carries its Content-Length, and so do these fields).
    fields: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


@dataclass(slots=True)
class _Head:
    method: str
    target: str
    version: str
    lines: list[bytes]  # the field lines passed on
    fields: list[tuple[bytes, bytes]]  # the same, as (lower-case name, value)
    length: int | None  # Content-Length, or None
    chunked: bool
    expect_continue: bool
    close: bool


Phase = Literal["idle", "head", "body"]


class RequestReader:
    """Incremental reader of requests on one connection.

    ``feed`` appends what was received; ``poll`` returns the next complete
    request (consuming it), None while one is incomplete, or raises
    :class:`Refused`. After a refusal the connection must close: where the
    next request would start is unknown.
    """

    def __init__(self, limits: Limits, accept_authority: Callable[[str], bool]) -> None:
        self._limits = limits
        self._accept_authority = accept_authority
        self._buf = bytearray()
        self._scanned = 0  # bytes of the head already searched for its end
        self._head: _Head | None = None
        self._head_len = 0  # bytes of the buffer taken by the head
        self._continue_due = False
        # Chunked decoding state: position in the buffer and what is expected there.
        self._cpos = 0
        self._cstate: Literal["size", "data", "data_crlf", "trailer"] = "size"
        self._cleft = 0
        self._body = bytearray()
        self._trailer_bytes = 0
        self._trailer_fields = 0
        # The method of the request being read, once its request line is in
        # (an answer to HEAD, even a refusal, carries no content).
        self.method = ""

    # -- state seen by the edge ----------------------------------------------------

    @property
    def phase(self) -> Phase:
        """idle: nothing of a request yet; head: its head is arriving; body: its body."""
        if self._head is not None:
            return "body"
        return "head" if self._buf else "idle"

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_continue(self) -> bool:
        """True once per request whose client waits for ``100 Continue`` before its body."""
        due, self._continue_due = self._continue_due, False
        return due

    def feed(self, data: bytes) -> None:
        self._buf += data

    # -- parsing ---------------------------------------------------------------------

    def poll(self) -> Request | None:
        if self._head is None and not self._read_head():
            return None
        head = self._head
        if head is None:  # _read_head() sets it when it returns True
            return None
        if head.chunked:
            body = self._read_chunked()
            if body is None:
                return None
            consumed = self._cpos
        else:
            need = head.length or 0
            if len(self._buf) - self._head_len < need:
                return None
            body = bytes(self._buf[self._head_len:self._head_len + need])
            consumed = self._head_len + need
        request = self._request(head, body)
        del self._buf[:consumed]
        self._reset()
        return request

    def _reset(self) -> None:
        self.method = ""
        self._scanned = 0
        self._head = None
        self._head_len = 0
        self._continue_due = False
        self._cpos = 0
        self._cstate = "size"
        self._cleft = 0
        self._body = bytearray()
        self._trailer_bytes = 0
        self._trailer_fields = 0

    def _read_head(self) -> bool:
        # RFC 9112 2.2: empty lines before a request line are ignored.
        while self._buf[:2] == _CRLF:
            del self._buf[:2]
            self._scanned = 0
        if self._buf[:1] == b"\n":
            raise Refused("bare LF in the request head")
        if not self._buf:
            return False
        lim = self._limits
        start = max(0, self._scanned - 3)
        end = self._buf.find(b"\r\n\r\n", start)
        scan_to = end + 4 if end >= 0 else len(self._buf)
        if self._buf.find(b"\n", self._scanned, scan_to) >= 0 and self._bare_lf(scan_to):
            raise Refused("bare CR or LF in the request head")
        self._scanned = scan_to
        line_end = self._buf.find(_CRLF, 0, min(len(self._buf), lim.max_request_line + 2))
        if line_end < 0:
            if len(self._buf) > lim.max_request_line + 1:
                raise Refused(f"request line longer than {lim.max_request_line} bytes")
            return False
        # The request line is checked as soon as it is complete, so garbage and
        # HTTP/0.9 are refused at once rather than at the header deadline.
        method, target, version, authority = self._request_line(bytes(self._buf[:line_end]))
        if end < 0:
            if len(self._buf) - line_end - 2 > lim.max_header_bytes + 2:
                raise Refused(f"header section larger than {lim.max_header_bytes} bytes")
            return False
        fields = bytes(self._buf[line_end + 2:end]).split(_CRLF) if end > line_end else []
        self._head = self._fields(method, target, version, authority, fields)
        self._head_len = end + 4
        self._cpos = self._head_len
        self._continue_due = self._head.expect_continue and (
            self._head.chunked or bool(self._head.length))
        return True

    def _bare_lf(self, upto: int) -> bool:
        """Whether any LF before ``upto`` lacks its CR, or a CR its LF."""
        view = bytes(self._buf[:upto])
        if view.endswith(b"\r"):
            view = view[:-1]  # its LF may be on its way
        crlf = view.count(_CRLF)
        return view.count(b"\n") != crlf or view.count(b"\r") != crlf

    def _request_line(self, line: bytes) -> tuple[str, str, str, str | None]:
        parts = line.split(b" ")
        if len(parts) != 3:
            if len(parts) == 2 and parts[1].startswith(b"/"):
                raise Refused("HTTP/0.9 requests are not served")
            raise Refused("malformed request line: METHOD SP target SP HTTP/1.1 expected")
        raw_method, raw_target, raw_version = parts
        if raw_version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if _VERSION.fullmatch(raw_version):
                raise Refused("HTTP version not supported: HTTP/1.1 or HTTP/1.0 expected")
            raise Refused("malformed request line: METHOD SP target SP HTTP/1.1 expected")
        if not _TOKEN.fullmatch(raw_method) or len(raw_method) > 32:
            raise Refused("malformed request line: the method is not a token")
        method = raw_method.decode("ascii")
        self.method = method
        if method not in ALLOWED_METHODS:
            # ETSI GS QKD 014 clause 5 and 020 clause 4 define GET and POST only;
            # HEAD in particular must never run a key endpoint.
            raise Refused(f"method {method} is not allowed: only GET and POST are served")
        if not raw_target or re.search(rb"[^\x21-\x7e]", raw_target) or b"#" in raw_target:
            raise Refused("malformed request target")
        authority: str | None = None
        if raw_target.startswith(b"/"):
            target = raw_target
        elif raw_target[:8].lower() == b"https://":
            rest = raw_target[8:]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0),
                      default=len(rest))
            auth, target = rest[:cut], rest[cut:]
            if not target.startswith(b"/"):
                target = b"/" + target
            if not auth or b"@" in auth or not _HOST.fullmatch(auth):
                raise Refused("malformed request target")
            authority = auth.decode("ascii")
            if not self._accept_authority(authority):
                raise Refused("the request target names another host")
        elif raw_target[:7].lower() == b"http://":
            raise Refused("the request target names another host")
        else:
            raise Refused("malformed request target: origin-form (/path) expected")
        return method, target.decode("ascii"), raw_version.decode("ascii"), authority

    def _fields(self, method: str, target: str, version: str, authority: str | None,
                lines: list[bytes]) -> _Head:
        lim = self._limits
        if len(lines) > lim.max_fields:
            raise Refused(f"more than {lim.max_fields} header fields")
        if sum(len(line) + 2 for line in lines) > lim.max_header_bytes:
            raise Refused(f"header section larger than {lim.max_header_bytes} bytes")
        kept: list[bytes] = []
        fields: list[tuple[bytes, bytes]] = []
        hosts: list[bytes] = []
        lengths: list[bytes] = []
        codings: list[bytes] = []
        expects: list[bytes] = []
        connection: list[bytes] = []
        for line in lines:
            name, value = self._field(line)
            if name == b"host":
                hosts.append(value)
                if authority is not None:
                    continue  # RFC 9112 3.2.2: the target's authority replaces Host
            elif name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value)
                continue
            elif name == b"expect":
                expects.append(value)
                continue
            elif name == b"connection":
                connection += [t.strip(b" \t").lower() for t in value.split(b",")]
            kept.append(line)
            fields.append((name, value))
        if authority is not None:
            kept.append(b"Host: " + authority.encode("ascii"))
            fields.append((b"host", authority.encode("ascii")))
            hosts = [authority.encode("ascii")]
        if len(hosts) > 1 or (version == "HTTP/1.1" and len(hosts) != 1):
            raise Refused("an HTTP/1.1 request needs exactly one Host header")
        if hosts and not _HOST.fullmatch(hosts[0]):
            raise Refused("malformed Host header")
        if len(lengths) > 1:
            raise Refused("more than one Content-Length")
        if len(codings) > 1:
            raise Refused("more than one Transfer-Encoding")
        if lengths and codings:
            raise Refused("Content-Length together with Transfer-Encoding")
        length: int | None = None
        if lengths:
            if not _DIGITS.fullmatch(lengths[0]):
                raise Refused("malformed Content-Length")
            length = int(lengths[0])
            if length > lim.max_body:
                raise Refused(f"request body larger than {lim.max_body} bytes")
        chunked = False
        if codings:
            if codings[0].lower() != b"chunked":
                raise Refused("unsupported transfer coding: only chunked is accepted")
            if version != "HTTP/1.1":
                raise Refused("chunked transfer coding needs HTTP/1.1")
            chunked = True
        if len(expects) > 1 or (expects and expects[0].lower() != b"100-continue"):
            raise Refused("unsupported Expect: only 100-continue is understood")
        close = b"close" in connection or (version == "HTTP/1.0"
                                           and b"keep-alive" not in connection)
        return _Head(method, target, version, kept, fields, length, chunked, bool(expects),
                     close)

    def _field(self, line: bytes) -> tuple[bytes, bytes]:
        if len(line) > self._limits.max_field_line:
            raise Refused(f"header field longer than {self._limits.max_field_line} bytes")
        if line[:1] in (b" ", b"\t"):
            raise Refused("obsolete line folding in the header section")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise Refused("malformed header field")
        if b"_" in name:
            raise Refused("header field names with '_' are refused")
        value = value.strip(b" \t")
        if _CTL.search(value):
            raise Refused("control character in a header field value")
        return name.lower(), value

    def _read_chunked(self) -> bytes | None:
        """RFC 9112 7.1: decode what has arrived; the body once the last chunk is in."""
        lim = self._limits
        buf = self._buf
        while True:
            if self._cstate == "size":
                end = buf.find(_CRLF, self._cpos, self._cpos + lim.max_chunk_line + 2)
                if end < 0:
                    if len(buf) - self._cpos > lim.max_chunk_line:
                        raise Refused("malformed chunked body: chunk-size line too long")
                    return None
                line = bytes(buf[self._cpos:end])
                size_text, _, ext = line.partition(b";")
                size_text = size_text.rstrip(b" \t")  # RFC 9112 7.1.1: BWS before ';'
                if not _CHUNK_SIZE.fullmatch(size_text) or b"\n" in line or b"\r" in line \
                        or _CTL.search(ext):
                    raise Refused("malformed chunked body: bad chunk size")
                size = int(size_text, 16)
                self._cpos = end + 2
                if size == 0:
                    self._cstate = "trailer"
                    continue
                if len(self._body) + size > lim.max_body:
                    raise Refused(f"request body larger than {lim.max_body} bytes")
                self._cleft = size
                self._cstate = "data"
            elif self._cstate == "data":
                take = min(len(buf) - self._cpos, self._cleft)
                self._body += buf[self._cpos:self._cpos + take]
                self._cpos += take
                self._cleft -= take
                if self._cleft:
                    return None
                self._cstate = "data_crlf"
            elif self._cstate == "data_crlf":
                if len(buf) - self._cpos < 2:
                    return None
                if buf[self._cpos:self._cpos + 2] != _CRLF:
                    raise Refused("malformed chunked body: chunk data not followed by CRLF")
                self._cpos += 2
                self._cstate = "size"
            else:  # trailer section: field lines up to an empty line, then dropped
                end = buf.find(_CRLF, self._cpos, self._cpos + lim.max_field_line + 2)
                if end < 0:
                    if len(buf) - self._cpos > lim.max_field_line:
                        raise Refused(f"header field longer than {lim.max_field_line} bytes")
                    return None
                line = bytes(buf[self._cpos:end])
                self._cpos = end + 2
                if not line:
                    return bytes(self._body)
                if b"\n" in line or b"\r" in line:
                    raise Refused("bare CR or LF in the trailer section")
                self._field(line)
                self._trailer_bytes += len(line) + 2
                self._trailer_fields += 1
                if (self._trailer_bytes > lim.max_header_bytes
                        or self._trailer_fields > lim.max_fields):
                    raise Refused("trailer section too large")

    @staticmethod
    def _request(head: _Head, body: bytes) -> Request:
        lines = [f"{head.method} {head.target} {head.version}".encode("ascii"), *head.lines]
        fields = head.fields
        if head.chunked:
            length = str(len(body)).encode("ascii")
            lines.append(b"Content-Length: " + length)
            fields = [*fields, (b"content-length", length)]
        wire = _CRLF.join(lines) + b"\r\n\r\n" + body
        return Request(head.method, head.target, head.version, wire, head.close, tuple(fields),
                       bytes(body))
