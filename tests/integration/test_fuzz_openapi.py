"""Issue 16: a short schema-driven fuzzing run against the documents the node serves.

Schemathesis reads each OpenAPI document from the live listener (node A's
ETSI 014 as SAE sae-a1, node B's ETSI 020 as the foreign KMS F), generates
requests that fit the schema and requests that break it, with a fixed seed
and a bounded number of cases, and checks every answer: no server error, a
documented status, a documented media type, a body that fits its schema,
and every request that breaks the schema refused. That last check is why
the documents state every limit the server enforces.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.trio import Trio

pytestmark = pytest.mark.integration

CASES_PER_OPERATION = 10
SEED = 20_016
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


def _session(trio: Trio, api: str) -> requests.Session:
    if api == "etsi020":
        return trio.foreign_session()
    entry = next(s for s in trio.manifest["saes"] if s["id"] == "sae-a1")
    s = requests.Session()
    s.trust_env = False
    s.verify = trio.ca
    s.cert = (entry["cert"], entry["key"])
    return s


def _fuzz(base: str, session: requests.Session, mode: GenerationMode) -> int:
    served = session.get(base + "/openapi.yaml", timeout=30)
    assert served.status_code == 200
    schema = schemathesis.openapi.from_dict(yaml.safe_load(served.content))
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @seed(SEED)
        @settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            # Schemathesis passes its own TLS settings; give it the session's.
            case.call_and_validate(base_url=base, session=session, checks=CHECKS, timeout=30,
                                   verify=session.verify, cert=session.cert)

        try:
            run()
        except Unsatisfiable:
            # An operation without inputs (GET /kmapi/versions) has no request
            # that breaks its schema.
            if mode is not GenerationMode.NEGATIVE:
                raise
    return calls


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
@pytest.mark.parametrize("api, node", [("etsi014", "A"), ("etsi020", "B")])
def test_fuzzing_finds_no_server_error_and_no_schema_violation(trio: Trio, api: str, node: str,
                                                               mode: GenerationMode) -> None:
    base = trio.node(node)[f"{api}_url"]
    session = _session(trio, api)
    try:
        assert _fuzz(base, session, mode) > 0
    finally:
        session.close()
