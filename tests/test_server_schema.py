"""Schema-driven fuzzing of the server (issue 19, item 3), as vLLM's tests/entrypoints/openai/test_openai_schema.py
does: schemathesis reads the server's own ``/openapi.json`` and sends requests generated from it (valid ones and
near-misses) to the app serving the tiny model, checking for every answer: no 5xx, the response conforms to the
documented schema, the status code is documented.

Bounded for CI (about 2 minutes on 2 cores): ``GLM_SCHEMA_EXAMPLES`` examples per operation (default 50). A longer
run: ``GLM_SCHEMA_EXAMPLES=500 python -m pytest -q tests/test_server_schema.py`` (docs/reliability.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
    status_code_conformance,
)

from glm_runtime import load  # noqa: E402
from glm_runtime.scheduler import Scheduler  # noqa: E402
from glm_runtime.server import ServerSettings, create_app  # noqa: E402

EXAMPLES = int(os.environ.get("GLM_SCHEMA_EXAMPLES", "50"))
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]


@pytest.fixture(scope="module")
def app(tiny_artifact: Path) -> Iterator[Any]:
    llm = load(tiny_artifact, threads=1, verify="none")
    sched = Scheduler(llm.engine, max_concurrency=4, max_queue=8, kv_budget_bytes=1 << 30)
    # max_tokens up to 16 and a small body bound keep each generated request short.
    yield create_app(llm, sched, ServerSettings("tiny", max_tokens_limit=16, max_body_bytes=64_000))
    sched.close()


@pytest.mark.slow
def test_openapi_schema(app: Any) -> None:
    """Every operation of the document, ``EXAMPLES`` generated requests each (hypothesis, derandomized)."""
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 8
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        run_operation(operation, statuses)
    print("statuses seen:", statuses)
    assert 200 in statuses["POST /v1/completions"] and 400 in statuses["POST /v1/completions"], statuses
    assert 200 in statuses["POST /v1/chat/completions"], statuses


def run_operation(operation: Any, statuses: dict[str, set[int]]) -> None:
    """``EXAMPLES`` generated requests against one operation, each answer checked; statuses collected."""
    from hypothesis import given

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS)
        statuses.setdefault(operation.label, set()).add(response.status_code)

    run()


def test_openapi_document_is_served_and_names_every_route(app: Any) -> None:
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        doc = c.get("/openapi.json").json()
    routes = {r.path for r in app.routes if getattr(r, "methods", None)} - {"/openapi.json"}
    assert set(doc["paths"]) == routes  # every route the app serves is documented
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatBody"}
    assert "messages" in doc["components"]["schemas"]["ChatBody"]["required"]
