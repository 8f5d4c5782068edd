"""Validate live responses against the OpenAPI 3.1 documents kmstn serves."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


@cache
def _spec(api: str) -> dict[str, Any]:
    text = resources.files("gateway").joinpath(f"openapi/{api}.yaml").read_text()
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


@cache
def _registry(api: str) -> Registry:
    return Registry().with_resource(f"urn:kmstn:{api}",
                                    Resource(contents=_spec(api), specification=DRAFT202012))


def check(api: str, method: str, path: str, status: int, content_type: str | None,
          body: bytes) -> Any:
    """Assert that (status, content type, body) is a documented answer; return the JSON."""
    operation = _spec(api)["paths"][path][method.lower()]
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {path}: status {status} is not documented"
    response = responses[str(status)]
    if "$ref" in response:
        name = response["$ref"].rsplit("/", 1)[1]
        response = _spec(api)["components"]["responses"][name]
    content = response.get("content")
    if not content:
        assert body == b"", f"{method} {path} {status}: expected no body, got {body[:200]!r}"
        return None
    media = (content_type or "").split(";")[0].strip()
    assert media in content, f"{method} {path} {status}: media type {media!r} not documented"
    data = json.loads(body)
    schema = content[media]["schema"]
    ref = schema["$ref"] if "$ref" in schema else None
    root = {"$ref": f"urn:kmstn:{api}{ref}"} if ref else schema
    Draft202012Validator(root, registry=_registry(api)).validate(data)
    return data


def check_response(api: str, method: str, path: str, resp: Any) -> Any:
    """Same as :func:`check` for a requests.Response."""
    return check(api, method, path, resp.status_code, resp.headers.get("Content-Type"),
                 resp.content)
