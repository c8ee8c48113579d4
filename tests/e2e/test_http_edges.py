"""Bad requests (400, 413, 415) and readiness when a dependency is down (503)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from escrow_stream.config import Settings
from tests.e2e.test_http_reads import call, token
from tests.harness import Stack, WorkerProcess, deployment

pytestmark = pytest.mark.integration

BODY_MAX = 4096


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings
) -> Iterator[tuple[Stack, WorkerProcess]]:
    # Redis on a port nothing listens on: /ready must say so, the API must keep working
    with deployment(
        tmp_path_factory.mktemp("edges"),
        REDIS_URL="redis://127.0.0.1:1/0",
        HTTP_BODY_MAX_BYTES=str(BODY_MAX),
    ) as running:
        yield running


def raw_post(worker: WorkerProcess, bearer: str, data: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{worker.base_url}/api/escrow",
        data=data,
        method="POST",
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


def test_bad_requests_get_problem_details(worker: tuple[Stack, WorkerProcess]) -> None:
    stack, process = worker
    bearer = token(stack, "edge-user")
    status, body = raw_post(process, bearer, b"{not json", "application/json")
    assert status == 400 and '"INVALID_JSON"' in body
    status, body = raw_post(process, bearer, b"<escrow/>", "application/xml")
    assert status == 415 and '"UNSUPPORTED_MEDIA_TYPE"' in body
    status, body = raw_post(
        process, bearer, b'{"pad": "' + b"x" * BODY_MAX + b'"}', "application/json"
    )
    assert status == 413 and '"PAYLOAD_TOO_LARGE"' in body
    status, body = raw_post(process, bearer, b"[1, 2]", "application/json")
    assert status == 400 and '"INVALID_JSON"' in body
    # deep nesting is bad JSON, not a crash
    status, body = raw_post(process, bearer, b"[" * 2000 + b"]" * 2000, "application/json")
    assert status == 400 and '"INVALID_JSON"' in body, body
    # NUL (or any C0 control but tab / newline) in free text: refused before acceptance
    status, _, problem = call(
        process,
        "POST",
        "/api/escrow/e-nul/dispute",
        bearer,
        {"reason": "broken\u0000again"},
    )
    assert status == 422 and problem["code"] == "VALIDATION_FAILED", problem
    assert "U+0000" in str(problem["errors"])


def test_ready_names_the_failing_dependency(worker: tuple[Stack, WorkerProcess]) -> None:
    stack, process = worker
    status, _, body = call(process, "GET", "/ready")
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["checks"]["kafka"] == "ok" and body["checks"]["postgres"] == "ok"
    assert body["checks"]["redis"] != "ok"
    # the rate limit fails open: the API still answers while Redis is down
    assert call(process, "GET", "/api/escrow", token(stack, "edge-user"))[0] == 200
