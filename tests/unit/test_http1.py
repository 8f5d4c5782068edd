"""The edge's HTTP/1.1 request reader (gateway/http1.py): framing, limits, refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.http1 import Limits, Refused, Request, RequestReader


def reader(limits: Limits | None = None) -> RequestReader:
    return RequestReader(limits or Limits(), lambda a: a.lower() in ("127.0.0.1:8014", "node-a"))


def one(data: bytes, limits: Limits | None = None) -> Request:
    r = reader(limits)
    r.feed(data)
    req = r.poll()
    assert req is not None
    assert r.phase == "idle"
    return req


def refused(data: bytes, limits: Limits | None = None) -> str:
    r = reader(limits)
    r.feed(data)
    with pytest.raises(Refused) as info:
        r.poll()
    return info.value.message


GET = b"GET /api/v1/keys/b/status HTTP/1.1\r\nHost: a\r\n\r\n"


def test_simple_get_and_post() -> None:
    req = one(GET)
    assert (req.method, req.target, req.version, req.close) == (
        "GET", "/api/v1/keys/b/status", "HTTP/1.1", False)
    assert req.wire == GET
    post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n{}  "
    assert one(post).wire == post


def test_incremental_and_pipelined() -> None:
    r = reader()
    data = GET + b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}" + b"GET /"
    got = []
    for i in range(len(data)):
        r.feed(data[i:i + 1])
        while (req := r.poll()) is not None:
            got.append(req.target)
    assert got == ["/api/v1/keys/b/status", "/x"]
    assert r.phase == "head" and r.buffered == 5


def test_phases() -> None:
    r = reader()
    assert r.phase == "idle"
    r.feed(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n")
    assert r.poll() is None and r.phase == "head"
    r.feed(b"\r\n{")
    assert r.poll() is None and r.phase == "body"
    r.feed(b"}   ")
    assert r.poll() is not None and r.phase == "idle"


def test_chunked_is_decoded_to_content_length() -> None:
    data = (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nX-Trailer: y\r\n\r\n")
    req = one(data)
    assert req.wire == (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\n"
                        b"{\"a\":1}")


def test_chunked_body_over_limit_is_refused_not_cut() -> None:
    lim = Limits(max_body=10)
    data = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n"
    r = reader(lim)
    r.feed(data)
    assert r.poll() is None
    r.feed(b"8\r\n12345678\r\n0\r\n\r\n")
    with pytest.raises(Refused, match="larger than 10 bytes"):
        r.poll()


@pytest.mark.parametrize("data, message", [
    (b"GET /x\r\n\r\n", "HTTP/0.9"),
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", "malformed request line"),
    (b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n", "version not supported"),
    (b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n", "method HEAD is not allowed"),
    (b"TRACE /x HTTP/1.1\r\nHost: a\r\n\r\n", "method TRACE is not allowed"),
    (b"GET /x HTTP/1.1\r\n\r\n", "exactly one Host"),
    (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "exactly one Host"),
    (b"GET https://evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n", "another host"),
    (b"GET http://node-a/x HTTP/1.1\r\nHost: a\r\n\r\n", "another host"),
    (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", "origin-form"),
    (b"GET /x#frag HTTP/1.1\r\nHost: a\r\n\r\n", "malformed request target"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     "Content-Length together with Transfer-Encoding"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
     "more than one Content-Length"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
     "only chunked"),
    (b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "needs HTTP/1.1"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     "bad chunk size"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
     "not followed by CRLF"),
    (b"GET /x HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "obsolete line folding"),
    (b"GET /x HTTP/1.1\r\nHost : a\r\n\r\n", "malformed header field"),
    (b"GET /x HTTP/1.1\r\nHost: a\r\nX_Forwarded: 1\r\n\r\n", "'_'"),
    (b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: \x01\r\n\r\n", "control character"),
    (b"GET /x HTTP/1.1\nHost: a\r\n\r\n", "bare CR or LF"),
    (b"GET /x HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n", "unsupported Expect"),
])
def test_malformed_requests_are_refused(data: bytes, message: str) -> None:
    assert message in refused(data)


def test_limits() -> None:
    assert "request line longer" in refused(b"GET /" + b"a" * 9000)
    assert "request line longer" in refused(b"GET /?q=" + b"a" * 8192 + b" HTTP/1.1\r\n")
    assert "header field longer" in refused(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "
                                            + b"a" * 20_000 + b"\r\n\r\n")
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    assert "more than 64 header fields" in refused(b"GET / HTTP/1.1\r\nHost: a\r\n" + many
                                                   + b"\r\n")
    assert "body larger than" in refused(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: "
                                         + str(5 * 1024 * 1024).encode() + b"\r\n\r\n")
    # A head that never ends is refused once it is over the limit, not at the deadline.
    partial = b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 5000
    assert "header section larger" in refused(partial)


def test_absolute_form_for_this_listener_becomes_origin_form() -> None:
    req = one(b"GET https://127.0.0.1:8014/api/v1/x?y=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert req.target == "/api/v1/x?y=1"
    assert req.wire == b"GET /api/v1/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:8014\r\n\r\n"


def test_expect_continue_is_answered_by_the_edge() -> None:
    r = reader()
    r.feed(b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert r.poll() is None
    assert r.take_continue() and not r.take_continue()
    r.feed(b"{}")
    req = r.poll()
    assert req is not None and b"Expect" not in req.wire


def test_connection_close_and_http10() -> None:
    assert one(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").close
    assert one(b"GET / HTTP/1.0\r\n\r\n").close
    assert not one(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").close


@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_none_or_a_refusal(data: bytes) -> None:
    r = reader(Limits(max_request_line=64, max_header_bytes=128, max_body=64))
    r.feed(data)
    try:
        while r.poll() is not None:
            pass
    except Refused as exc:
        assert exc.message


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=7))
def test_chunked_round_trip_in_any_split(chunks: list[bytes], step: int) -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    data = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    r = reader()
    got = None
    for i in range(0, len(data), step):
        r.feed(data[i:i + step])
        got = r.poll() or got
    assert got is not None and got.wire.endswith(b"\r\n\r\n" + b"".join(chunks))


def test_the_method_is_known_once_the_request_line_is_in() -> None:
    r = reader()
    r.feed(b"HEAD /x HTTP/1.1\r\n")
    with pytest.raises(Refused):
        r.poll()
    assert r.method == "HEAD"
    r = reader()
    r.feed(GET)
    assert r.poll() is not None and r.method == ""
