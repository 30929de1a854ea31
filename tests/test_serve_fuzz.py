"""Schema-driven fuzzing of every endpoint: schemathesis turns the server's own OpenAPI schema into
valid and invalid requests (hypothesis drives them); none may get a 5xx or a non-OpenAI error body.

schemathesis's pytest plugin does not work with this pytest, so its strategies are driven directly.
"""

from __future__ import annotations

import pytest

from test_serve import start_server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = 20  # per operation and mode: ~5 operations x 2 modes


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir):
    # A low max_tokens cap keeps each generated request fast on the tiny model.
    with start_server(tiny_model_dir, {}, max_tokens=4, default_max_tokens=2) as (url, _):
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema, mode):
    ops = operations(api_schema)
    assert {op.path for op in ops} >= {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health"}
    for op in ops:
        if mode == GenerationMode.NEGATIVE and op.method.upper() in ("GET", "DELETE"):
            continue  # no body, at most a free-form name in the path: there is no invalid input to make
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(timeout=30)
            assert response.status_code < 500, f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code}: {response.text[:300]}"
            if response.status_code >= 400:
                assert {"message", "type", "param", "code"} <= set(response.json()["error"])

        check()
