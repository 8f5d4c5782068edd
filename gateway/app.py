"""create_app(): the Flask application for one listener (etsi014 or etsi020)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any, Final, Literal

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from gateway.deps import Edge
from gateway.errors import etsi014_error, etsi014_headers, etsi020_problem
from gateway.http1 import Limits
from kme import etsi020
from kme import log as kmelog
from kme import metrics as kmetrics
from kme.config import CSPRNG_MAX_PER_REQUEST, MAX_SAE_ID_COUNT, NodeConfig
from kme.errors import ErrorCode, KmstnError

__all__ = ["Api", "create_app", "json_response"]

Api = Literal["etsi014", "etsi020"]
MAX_BODY = Limits().max_body
# POST bodies are JSON (ETSI 014 clause 2, 020 clause 2); 020 between kmstn
# nodes also carries the sealed envelope. A POST without Content-Type is read
# as JSON all the same (clients that send none exist).
MEDIA_TYPES: Final[dict[str, frozenset[str]]] = {
    "etsi014": frozenset({"application/json"}),
    "etsi020": frozenset({"application/json", etsi020.SEALED_MEDIA_TYPE}),
}
_CLIENT_ID_KEEP = re.compile(r"[^A-Za-z0-9._:\-]")
_NODE_LIMIT = re.compile(r"#\s*node:\s*(\w+)")  # see openapi_document()


def client_request_id(value: str | None) -> str | None:
    """A client's own request ID, fit for a log field: 64 safe characters at most."""
    if not value:
        return None
    return _CLIENT_ID_KEEP.sub("", value[:128])[:64] or None


def json_response(body: Any, status: int = 200, content_type: str = "application/json",
                  raw: bytes | None = None) -> Response:
    data = raw if raw is not None else json.dumps(body, separators=(",", ":")).encode()
    return Response(data, status=status, content_type=content_type)


def openapi_document(api: Api, config: NodeConfig | None = None) -> bytes:
    """The OpenAPI document of one API, stating this node's limits when ``config`` is given.

    The file states the defaults; a line ending ``# node: NAME`` has its last
    number replaced by this node's value of NAME (see :func:`served_limits`).
    """
    text = resources.files("gateway").joinpath(f"openapi/{api}.yaml").read_text()
    if config is None:
        return text.encode()
    limits = served_limits(config)
    out = []
    for line in text.splitlines(keepends=True):
        match = _NODE_LIMIT.search(line)
        if match:
            head = line[:match.start()]
            numbers = list(re.finditer(r"\d+", head))
            last = numbers[-1]
            line = (head[:last.start()] + str(limits[match.group(1)]) + head[last.end():]
                    + line[match.start():])
        out.append(line)
    return "".join(out).encode()


def served_limits(config: NodeConfig) -> dict[str, int]:
    """This node's ETSI 014 limits over every slave it serves (kme.flows.limits_for).

    Keys come from one of the node's QKD links (or the OS CSPRNG on a node
    without any), so the bounds are the widest over those links.
    """
    links = [link for link in config.topology.qkd_links if config.node_id in (link.a, link.b)]
    if not links:
        size = config.topology.key_size
        return {"min_key_size": min(64, size), "max_key_size": max(1024, size),
                "max_key_per_request": CSPRNG_MAX_PER_REQUEST, "max_sae_id_count": MAX_SAE_ID_COUNT}
    return {"min_key_size": min(link.min_key_size for link in links),
            "max_key_size": max(link.max_key_size for link in links),
            "max_key_per_request": max(link.max_key_per_request for link in links),
            "max_sae_id_count": MAX_SAE_ID_COUNT}


def create_app(api: Api, config: NodeConfig, edge: Edge) -> Flask:
    """One Flask app per listener; ``edge`` carries the node's service clients."""
    app = Flask(f"kmstn-{api}")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["kmstn.config"] = config
    app.config["kmstn.edge"] = edge
    log = logging.getLogger(f"kmstn.gateway.{api}")
    render: Callable[[KmstnError], Response]

    if api == "etsi014":
        from gateway.etsi014.views import blueprint

        def render(exc: KmstnError) -> Response:
            status, body = etsi014_error(exc)
            resp = json_response(body, status)
            resp.headers.update(etsi014_headers(exc))
            return resp
    else:
        from gateway.etsi020.views import blueprint

        def render(exc: KmstnError) -> Response:
            # RFC 9457 problem details, served as application/json: the ETSI
            # 020 V1.1.1 checklist asks for that media type on every error.
            status, body = etsi020_problem(exc)
            return json_response(None, status, raw=body)

    app.register_blueprint(blueprint)
    media_types = MEDIA_TYPES[api]
    if api == "etsi014":
        from gateway.skip.views import blueprint as skip  # SKIP beside 014 (issue 14)

        app.register_blueprint(skip)

    @app.get("/healthz")
    def healthz() -> Response:
        return json_response({"status": "ok", "node": config.node_id, "api": api})

    document = openapi_document(api, config)

    @app.get("/openapi.yaml")
    def openapi() -> Response:
        return Response(document, content_type="application/yaml")

    @app.before_request
    def start() -> Response | None:
        g.started = time.perf_counter()
        # The request ID is always ours; a client's X-Request-ID is only kept
        # as a separate log field, cut and stripped so it cannot forge lines.
        g.request_id = str(uuid.uuid4())
        g.log_context = kmelog.log_context(
            request_id=g.request_id, api=api,
            client_request_id=client_request_id(request.headers.get("X-Request-ID")))
        g.log_context.__enter__()
        if request.method not in ("GET", "POST"):
            # ETSI 014 clause 5 and 020 clause 4 use GET and POST only. HEAD
            # would run a GET view (and draw a key for HEAD enc_keys), TRACE
            # and OPTIONS mean nothing here. (The edge refuses them first.)
            return refuse(f"method {request.method} is not allowed: only GET and POST")
        if request.method == "POST" and request.content_type is not None:
            mimetype = request.mimetype
            charset = request.mimetype_params.get("charset", "utf-8").lower()
            if mimetype not in media_types or charset not in ("utf-8", "utf8"):
                return refuse(f"Content-Type must be {' or '.join(sorted(media_types))} "
                              "(UTF-8)")
        return None

    @app.teardown_request
    def finish(_exc: BaseException | None) -> None:
        ctx = g.pop("log_context", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    @app.after_request
    def stamp(resp: Response) -> Response:
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        resp.headers["Cache-Control"] = "no-store"  # responses may carry key material
        if "started" in g:
            # The endpoint's name, never the path: paths carry SAE IDs and key IDs.
            operation = (request.endpoint or "unmatched").rpartition(".")[2]
            seconds = time.perf_counter() - g.started
            kmetrics.observe_http_request(api, operation, resp.status_code, seconds)
            # One line per request: with the request ID it ties this listener's
            # part of a key's path to the relay's (kmstn trace).
            log.info("request served", extra={"operation": operation,
                                              "http_status": resp.status_code,
                                              "ms": round(seconds * 1000, 2)})
        return resp

    def refuse(message: str) -> Response:
        # A request refused for its form (method, media type, path, size):
        # one WARNING line, no traceback, and the API's own 400.
        log.warning("request refused", extra={"path": request.path, "method": request.method,
                                               "reason": message})
        return render(KmstnError(ErrorCode.INVALID_ARGUMENT, message))

    @app.errorhandler(KmstnError)
    def on_kmstn_error(exc: KmstnError) -> Response:
        level = logging.WARNING if exc.code in (ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE,
                                                ErrorCode.TIMEOUT) else logging.INFO
        log.log(level, "request failed", extra={
            "path": request.path, "error_code": exc.code.name, "error": exc.public,
            "cause": exc.cause})
        return render(exc)

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        # Unknown paths, wrong methods and oversized bodies are bad requests in
        # the API's own error format: ETSI 014 and 020 define no other codes.
        code = exc.code or 400
        if code == 413:
            message = f"request body larger than {MAX_BODY} bytes"
        elif code == 405:
            message = f"method {request.method} not allowed on {request.path}"
        elif code == 404:
            message = f"no such endpoint: {request.path}"
        else:
            message = "bad request"
        return refuse(message)

    @app.errorhandler(Exception)
    def on_crash(exc: Exception) -> Response:
        log.exception("request crashed", extra={"path": request.path})
        return render(KmstnError(ErrorCode.INTERNAL, "internal error"))

    return app
