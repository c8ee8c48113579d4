"""On EscrowCreated the payments agent creates a PaymentIntent on stripe-mock, and the buyer
reads its id and client secret on the escrow."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from escrow_stream.config import Settings
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, token
from tests.harness import Stack, WorkerProcess, deployment, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(
        tmp_path_factory.mktemp("stripe-pi"),
        PAYMENTS_EFFECTS_ENABLED="true",
        STRIPE_API_BASE="http://127.0.0.1:12111",
    ) as running:
        yield running


def test_payment_instructions_reach_the_buyer(worker: tuple[Stack, WorkerProcess]) -> None:
    stack, process = worker
    run = uuid.uuid4().hex[:8]
    buyer = f"pi-b-{run}"
    status, _, escrow = call(
        process,
        "POST",
        "/api/escrow",
        token(stack, buyer),
        create_body(f"pi-s-{run}"),
        {"Prefer": "wait=30"},
    )
    assert status == 201, escrow
    escrow_id = escrow["escrowId"]

    async def instructed() -> Any:
        status, _, body = call(process, "GET", f"/api/escrow/{escrow_id}", token(stack, buyer))
        return body if status == 200 and body.get("payment") else None

    body = asyncio.run(eventually(instructed, timeout_s=60))
    assert body is not None, process.log_tail()
    payment = body["payment"]
    assert payment["provider"] == "stripe"
    assert payment["providerPaymentId"].startswith("pi_")
    assert payment["clientSecret"].startswith("pi_") and "_secret_" in payment["clientSecret"]

    events = asyncio.run(stack.events(lambda es: False, timeout_s=3))
    mine = [e for e in events if e["escrowId"] == escrow_id]
    assert [e["type"] for e in mine] == ["EscrowCreated", "PaymentInstructionsRecorded"]
    assert mine[1]["causationId"] == f"payments:instructions:{escrow_id}"
