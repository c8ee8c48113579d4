"""Rate limits (429 with Retry-After, shared through Redis) and CORS on a live worker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from escrow_stream.config import Settings
from tests.e2e.test_http_reads import call, token
from tests.harness import Stack, WorkerProcess

pytestmark = pytest.mark.integration

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings) -> Iterator[Stack]:
    stack = Stack.create(
        tmp_path_factory.mktemp("limits"),
        RATE_LIMIT_PER_IP_PER_MINUTE="1000000",
        RATE_LIMIT_PER_USER_PER_MINUTE="3",
        CORS_ORIGINS=ORIGIN,
    )
    asyncio.run(stack.create_topics())
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def workers(stack: Stack) -> Iterator[list[WorkerProcess]]:
    # two replicas with one Redis: the per-user count is shared between them
    workers = [stack.worker("a").start(), stack.worker("b").start()]
    for w in workers:
        w.wait_healthy()
    yield workers
    for w in workers:
        assert w.stop() == 0, w.log_tail()


def test_per_user_limit_is_shared_across_replicas(
    stack: Stack, workers: list[WorkerProcess]
) -> None:
    bearer = token(stack, f"limited-{uuid.uuid4().hex[:8]}")
    if time.time() % 60 > 50:  # all four requests must fall into one one-minute window
        time.sleep(61 - time.time() % 60)
    statuses = [call(workers[i % 2], "GET", "/api/escrow", bearer)[0] for i in range(3)]
    assert statuses == [200, 200, 200]
    status, headers, problem = call(workers[1], "GET", "/api/escrow", bearer)
    assert (status, problem["code"]) == (429, "RATE_LIMITED")
    assert 1 <= int(headers["Retry-After"]) <= 60
    # other users and the probes are not affected
    assert call(workers[0], "GET", "/api/escrow", token(stack, "someone-else"))[0] == 200
    assert call(workers[0], "GET", "/health")[0] == 200


def test_cors_preflight_for_allowed_origin_only(stack: Stack, workers: list[WorkerProcess]) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,idempotency-key",
    }
    status, headers, _ = call(workers[0], "OPTIONS", "/api/escrow", headers=preflight)
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    other = {**preflight, "Origin": "https://evil.example.com"}
    status, headers, _ = call(workers[0], "OPTIONS", "/api/escrow", headers=other)
    assert "Access-Control-Allow-Origin" not in headers
