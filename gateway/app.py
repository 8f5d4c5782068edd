"""create_app(): the Flask application for one listener (etsi014 or etsi020)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any, Literal

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from gateway.deps import Edge
from gateway.errors import etsi014_error, etsi014_headers, etsi020_problem
from kme import log as kmelog
from kme import metrics as kmetrics
from kme.config import NodeConfig
from kme.errors import ErrorCode, KmstnError

__all__ = ["Api", "create_app", "json_response"]

Api = Literal["etsi014", "etsi020"]
MAX_BODY = 4 * 1024 * 1024


def json_response(body: Any, status: int = 200, content_type: str = "application/json",
                  raw: bytes | None = None) -> Response:
    data = raw if raw is not None else json.dumps(body, separators=(",", ":")).encode()
    return Response(data, status=status, content_type=content_type)


def openapi_document(api: Api) -> bytes:
    return resources.files("gateway").joinpath(f"openapi/{api}.yaml").read_bytes()


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
    if api == "etsi014":
        from gateway.skip.views import blueprint as skip  # SKIP beside 014 (issue 14)

        app.register_blueprint(skip)

    @app.get("/healthz")
    def healthz() -> Response:
        return json_response({"status": "ok", "node": config.node_id, "api": api})

    @app.get("/openapi.yaml")
    def openapi() -> Response:
        return Response(openapi_document(api), content_type="application/yaml")

    @app.before_request
    def start() -> None:
        g.started = time.perf_counter()
        # A caller's (or upstream neighbour's) ID is kept, so one key's path
        # through the federation shares one ID in every node's logs.
        g.request_id = (kmelog.adopt_request_id(request.headers.get(kmelog.REQUEST_ID_HEADER))
                        or str(uuid.uuid4()))
        g.log_context = kmelog.log_context(request_id=g.request_id, api=api)
        g.log_context.__enter__()

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
        return render(KmstnError(ErrorCode.INVALID_ARGUMENT, message))

    @app.errorhandler(Exception)
    def on_crash(exc: Exception) -> Response:
        log.exception("request crashed", extra={"path": request.path})
        return render(KmstnError(ErrorCode.INTERNAL, "internal error"))

    return app
