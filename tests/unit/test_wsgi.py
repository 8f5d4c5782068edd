"""The 014 worker's WSGI side (gateway/wsgi.py): a checked request's environ, one-write answers.

The environ used to come from Gunicorn's parser reading the edge's bytes a
second time; these tests hold ours to what Gunicorn's gave for the same
requests, key by key.
"""

from __future__ import annotations

import email.utils

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi as gwsgi
from gunicorn.http.parser import RequestParser

from gateway.http1 import Limits, Request, RequestReader
from gateway.wsgi import Answer, environ_for

PEER = ("127.0.0.7", 40123)
SERVER = ("127.0.0.1", 8014)

REQUESTS = [
    b"GET /api/v1/keys/SAE2/status HTTP/1.1\r\nHost: 127.0.0.1:8014\r\n\r\n",
    b"GET /api/v1/keys/SAE%202/enc_keys?number=2&size=256 HTTP/1.1\r\nHost: a\r\n"
    b"Accept: application/json\r\nX-Request-ID: abc-1\r\n\r\n",
    b'POST /api/v1/keys/SAE2/enc_keys HTTP/1.1\r\nHost: a\r\nContent-Type: application/json'
    b'\r\nContent-Length: 13\r\n\r\n{"number": 1}',
    b"POST /api/v1/keys/SAE1/dec_keys HTTP/1.1\r\nHost: a\r\nContent-Type: application/json"
    b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"key\r\n6\r\n_IDs\":\r\n3\r\n[]}\r\n0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nAccept: text/plain\r\nAccept: application/json\r\n"
    b"Cache-Control: no-cache\r\n\r\n",
    b"GET https://127.0.0.1:8014/api/v1/keys/B/status?x=%2F HTTP/1.1\r\nHost: other\r\n\r\n",
    b"GET /api/v1/keys/B/status HTTP/1.0\r\n\r\n",
    b"GET /caf%C3%A9/%2e%2E/status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
]

# Keys Gunicorn adds that nothing of ours reads (its banner, its own objects).
GUNICORN_ONLY = {"SERVER_SOFTWARE", "wsgi.errors", "wsgi.file_wrapper", "wsgi.early_hints",
                 "wsgi.input", "gunicorn.socket"}


def checked(wire: bytes) -> Request:
    reader = RequestReader(Limits(), lambda authority: authority == "127.0.0.1:8014")
    reader.feed(wire)
    request = reader.poll()
    assert request is not None
    return request


class _Sock:
    def send(self, data: bytes) -> int:
        raise AssertionError("nothing is sent while the environ is built")


def gunicorn_environ(request: Request) -> dict[str, object]:
    """What the 014 worker built before: Gunicorn under TLS, several workers, threads."""
    cfg = Config()
    cfg.set("certfile", "node.pem")  # only read as "this listener is TLS": https
    cfg.set("workers", 2)
    parsed = next(RequestParser(cfg, [request.wire], PEER))
    _, environ = gwsgi.create(parsed, _Sock(), PEER, SERVER, cfg)
    environ["wsgi.multithread"] = True  # the worker set this itself
    return environ


@pytest.mark.parametrize("wire", REQUESTS)
def test_the_environ_is_gunicorns_for_the_same_request(wire: bytes) -> None:
    request = checked(wire)
    ours = environ_for(request, _Sock(), PEER, SERVER, multiprocess=True)
    theirs = gunicorn_environ(request)
    assert {k: v for k, v in ours.items() if k not in GUNICORN_ONLY} == {
        k: v for k, v in theirs.items() if k not in GUNICORN_ONLY}
    assert ours["wsgi.input"].read() == theirs["wsgi.input"].read()  # type: ignore[attr-defined]


def test_the_body_is_the_decoded_body_and_the_socket_is_passed_on() -> None:
    sock = _Sock()
    environ = environ_for(checked(REQUESTS[3]), sock, PEER, SERVER, multiprocess=False)
    assert environ["wsgi.input"].read() == b'{"key_IDs":[]}'
    assert environ["CONTENT_LENGTH"] == "14"
    assert environ["gunicorn.socket"] is sock  # gateway/auth.py reads the peer certificate
    assert environ["wsgi.multiprocess"] is False


def head_and_body(raw: bytes) -> tuple[list[str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n"), body


def test_an_answer_is_one_block_with_date_connection_and_its_length() -> None:
    answer = Answer("HTTP/1.1")
    write = answer.start_response("200 OK", [("Content-Type", "application/json"),
                                             ("Content-Length", "999"),
                                             ("Cache-Control", "no-store")])
    write(b'{"a":')
    answer.write(b"1}")
    lines, body = head_and_body(answer.render(keep_alive=True))
    assert lines[0] == "HTTP/1.1 200 OK"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert email.utils.parsedate_to_datetime(fields["Date"]) is not None
    assert fields["Connection"] == "keep-alive"
    assert fields["Content-Length"] == "7" and body == b'{"a":1}'  # counted, not believed
    assert fields["Cache-Control"] == "no-store" and "Server" not in fields
    assert sum(line.lower().startswith("content-length:") for line in lines) == 1


def test_http_1_0_is_answered_in_kind_and_close_is_said() -> None:
    answer = Answer("HTTP/1.0")
    answer.start_response("400 Bad Request", [("Content-Type", "application/json")])
    lines, _ = head_and_body(answer.render(keep_alive=False))
    assert lines[0] == "HTTP/1.0 400 Bad Request"
    assert "Connection: close" in lines


def test_hop_by_hop_headers_from_the_app_are_dropped() -> None:
    answer = Answer("HTTP/1.1")
    answer.start_response("200 OK", [("Connection", "close"), ("Transfer-Encoding", "chunked"),
                                     ("Keep-Alive", "timeout=5"), ("X-Ok", "1")])
    lines, _ = head_and_body(answer.render(keep_alive=True))
    names = [line.split(":")[0].lower() for line in lines[1:]]
    assert names.count("connection") == 1 and "Connection: keep-alive" in lines
    assert "transfer-encoding" not in names and "keep-alive" not in names
    assert "X-Ok: 1" in lines


@pytest.mark.parametrize("header", [("X-Bad\r\nSet-Cookie", "1"), ("X-Bad", "a\r\nSet-Cookie: x"),
                                    ("X-Bad", "a\nb"), ("X Bad", "1"), ("X-Bad", "\x00")])
def test_no_response_splitting(header: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        Answer("HTTP/1.1").start_response("200 OK", [header])


def test_no_content_statuses_carry_no_body() -> None:
    answer = Answer("HTTP/1.1")
    answer.start_response("204 No Content", [])
    answer.write(b"dropped")
    lines, body = head_and_body(answer.render(keep_alive=True))
    assert body == b"" and not any(line.lower().startswith("content-length") for line in lines)


def test_start_response_twice_needs_exc_info() -> None:
    answer = Answer("HTTP/1.1")
    answer.start_response("200 OK", [])
    with pytest.raises(AssertionError):
        answer.start_response("500 Internal Server Error", [])
    answer.start_response("500 Internal Server Error", [], exc_info=(None, None, None))
    assert answer.render(keep_alive=False).startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
