"""Two workers on two addresses (127.0.0.2 and 127.0.0.3) with the same port, as on two
hosts: every worker answers for every escrow (reads and waits go to the owner, signed as
worker-to-worker requests), 403 / 404 hold on either, and 60 waits within a minute meet
the seed's default rate limits without a single 429."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role
from escrow_stream.web.internal import INTERNAL_HEADER
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, token
from tests.harness import Stack, WorkerProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

HOSTS = ("127.0.0.2", "127.0.0.3")
BUYERS = 6
WAITS_PER_BUYER = 10


def client(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[WorkerProcess]]]:
    stack = Stack.create(
        tmp_path_factory.mktemp("two-hosts"),
        # the seed's defaults, not the harness's unlimited ones: limits are under test here
        RATE_LIMIT_PER_IP_PER_MINUTE="100",
        RATE_LIMIT_PER_USER_PER_MINUTE="50",
        FEATURE_KYC_GATING="true",
        # the test client plays an ingress on 127.0.0.1 that names clients in X-Forwarded-For
        TRUSTED_PROXIES="127.0.0.1/32",
    )
    asyncio.run(stack.create_topics())
    port = str(free_port())
    workers = [stack.worker(f"h{i}", WEB_HOST=host, PORT=port) for i, host in enumerate(HOSTS)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.wait_healthy()
        yield stack, workers
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0], [w.log_tail() for w in workers]


def test_waits_reads_and_refusals_on_either_host(
    hosts: tuple[Stack, list[WorkerProcess]], stack_settings: Settings
) -> None:
    stack, workers = hosts
    run = uuid.uuid4().hex[:6]
    seller = f"seller-{run}"
    buyers = [f"buyer-{run}-{i}" for i in range(BUYERS)]
    admin = token(stack, f"ops-{run}", Role.ADMIN)
    waiting = client("198.51.100.1")  # this test sends 89 requests: under 100 a minute
    for user in [seller, *buyers]:
        status, _, body = call(
            workers[0], "PUT", f"/api/kyc/{user}", admin, {"status": "VERIFIED"}, waiting
        )
        assert status == 200, body

    created: list[tuple[str, str, WorkerProcess]] = []  # (escrow, buyer, worker asked)
    answers: list[int] = []
    for n in range(WAITS_PER_BUYER):
        for i, buyer in enumerate(buyers):
            worker = workers[(n + i) % 2]
            status, _, body = call(
                worker,
                "POST",
                "/api/escrow",
                token(stack, buyer),
                create_body(seller),
                {"Prefer": "wait=20"} | waiting,
            )
            answers.append(status)
            if status == 201:
                created.append((body["escrowId"], buyer, worker))
    assert answers == [201] * (BUYERS * WAITS_PER_BUYER), answers

    # every escrow reads the same from both hosts, whichever owns it
    for escrow_id, buyer, _ in created[:: len(created) // 5]:  # 5 escrows, 20 reads
        bodies: list[dict[str, Any]] = []
        for worker in workers:
            status, _, body = call(
                worker, "GET", f"/api/escrow/{escrow_id}", token(stack, buyer), headers=waiting
            )
            assert status == 200, body
            bodies.append(body)
            status, _, body = call(
                worker,
                "GET",
                f"/api/escrow/{escrow_id}",
                token(stack, f"stranger-{run}"),
                headers=waiting,
            )
            assert (status, body["code"]) == (403, "NOT_AUTHORIZED")
        assert bodies[0] == bodies[1]
        assert bodies[0]["buyerId"] == buyer and bodies[0]["status"] == "AWAIT_FUNDS"
    for worker in workers:
        status, _, body = call(
            worker, "GET", f"/api/escrow/nothing-{run}", token(stack, buyers[0]), headers=waiting
        )
        assert (status, body["code"]) == (404, "NOT_FOUND")


def test_limits_count_clients_through_the_trusted_proxy_and_ignore_forged_signatures(
    hosts: tuple[Stack, list[WorkerProcess]],
) -> None:
    stack, workers = hosts
    run = uuid.uuid4().hex[:6]
    forged = {INTERNAL_HEADER: f"{int(time.time())}.{'ab' * 32}"}
    user = f"eager-{run}"
    statuses = [
        call(
            workers[i % 2],
            "GET",
            "/api/escrow",
            token(stack, user),
            headers=client("198.51.100.2") | (forged if i % 3 == 0 else {}),
        )[0]
        for i in range(55)
    ]
    assert statuses.count(200) == 50 and set(statuses[50:]) == {429}, statuses
    # per client IP, as the trusted proxy names it: 100 a minute, whoever the users are
    statuses = [
        call(
            workers[i % 2],
            "GET",
            "/api/escrow",
            token(stack, f"crowd-{run}-{i}"),
            headers=client("198.51.100.3"),
        )[0]
        for i in range(105)
    ]
    assert statuses.count(200) == 100 and set(statuses[100:]) == {429}, statuses
