"""Schema-driven fuzzing of the HTTP API (schemathesis): every operation in the OpenAPI document, driven by
generated requests against a real uvicorn server on 127.0.0.1.

Passing means: no answer >= 500, and every answer conforms to the schema (status codes, content types and
bodies the document declares). One schemathesis check is left out: "a schema-valid request must be accepted"
(``positive_data_acceptance``). The schema can say an upload is a binary file; it cannot say the bytes must
decode as an image, so an empty or random "file" is rightly a 400. The default run generates a few examples
per operation; ``-m slow`` runs many more. Generated multipart bodies exercise the image search's validation
(missing or malformed parts, out-of-range ``k``/``min_score``), which is what a fuzzer can reach.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402  (installed with schemathesis)

from serving.api.server import running_server  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.settings import ServeSettings  # noqa: E402

FAST_EXAMPLES = 8
SLOW_EXAMPLES = 100


@pytest.fixture(scope="module")
def server_url(calibrated_index) -> Iterator[str]:
    with running_server(create_app(ServeSettings(index=calibrated_index, max_k=50))) as url:
        yield url


def _fuzz(server_url: str, examples: int) -> list[str]:
    """Drive every operation with ``examples`` generated requests; return what ran (``METHOD path: count``)."""
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()
        statuses: list[int] = []
        _driver(operation, examples, statuses)()
        ran.append(f"{operation.method.upper()} {operation.path}: {len(statuses)}")
    return ran


def _driver(operation, examples: int, statuses: list[int]):
    """A Hypothesis test over ``operation``'s generated requests, recording each answer's status."""
    from hypothesis import given
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    @given(case=operation.as_strategy())
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def drive(case) -> None:
        response = case.call(timeout=30)
        where = f"{case.method} {case.path}: {response.status_code}"
        assert response.status_code < 500, f"{where} {response.text[:300]}"
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
        statuses.append(response.status_code)

    return drive


def test_api_survives_generated_requests(server_url):
    ran = {line.split(":")[0] for line in _fuzz(server_url, FAST_EXAMPLES)}
    expected = {"POST /v1/search", "POST /v1/search/embedding", "GET /v1/index", "GET /v1/items/{item_id}/thumbnail"}
    assert expected <= ran, ran


@pytest.mark.slow
def test_api_survives_many_generated_requests(server_url):
    _fuzz(server_url, SLOW_EXAMPLES)
