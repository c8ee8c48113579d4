"""End to end over HTTP: create → funds (system command) → deliver → release → settlement
confirmed → GET shows RELEASED, history and PostgreSQL have every event; idempotency."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import pytest

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role
from tests.builders import TEST_PAYOUTS, wire_command
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.harness import Stack, WorkerProcess, activate_payouts, eventually

pytestmark = pytest.mark.integration

SYSTEM = {"id": "payments-agent", "role": "system"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings) -> Iterator[Stack]:
    stack = Stack.create(tmp_path_factory.mktemp("flow"))
    asyncio.run(stack.create_topics())
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[WorkerProcess]:
    worker = stack.worker("api").start()
    worker.wait_healthy()
    yield worker
    assert worker.stop() == 0, worker.log_tail()


def confirm_funds(escrow_id: str, payment_id: str, amount: int = 10_000) -> dict[str, Any]:
    """ConfirmFunds as the payments agent sends it for a paid Stripe PaymentIntent (signed
    on send by the harness)."""
    payload = {
        "provider": "stripe",
        "providerPaymentId": payment_id,
        "amount": str(amount),
        "currency": "USD",
    }
    return wire_command("ConfirmFunds", escrow_id, SYSTEM, payload)


def create_body(seller: str, amount: int = 10_000) -> dict[str, Any]:
    """A buyer's create body: no payout field (the fee is ESCROW_FEE_BPS, 5% in the tests)."""
    return {
        "offerId": "offer-1",
        "contractId": "contract-1",
        "rail": "STRIPE",
        "amount": str(amount),
        "currency": "USD",
        "sellerId": seller,
    }


def test_full_flow_over_http(stack: Stack, worker: WorkerProcess) -> None:
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"b-{run}", f"s-{run}"
    wait = {"Prefer": "wait=20"}

    status, headers, escrow = call(
        worker, "POST", "/api/escrow", token(stack, buyer), create_body(seller), wait
    )
    assert status == 201, escrow
    assert headers["Preference-Applied"] == "wait=20"
    escrow_id = escrow["escrowId"]
    assert (escrow["status"], escrow["buyerId"], escrow["sellerId"]) == (
        "AWAIT_FUNDS",
        buyer,
        seller,
    )

    asyncio.run(stack.send([confirm_funds(escrow_id, f"pi_{run}")]))

    held = escrow_when(stack, worker, buyer, escrow_id, lambda e: e["status"] == "FUNDS_HELD")
    assert held is not None

    status, _, body = call(
        worker,
        "POST",
        f"/api/escrow/{escrow_id}/deliver",
        token(stack, seller),
        {"note": "shipped"},
        wait,
    )
    assert (status, body["status"]) == (200, "DELIVERED"), body
    asyncio.run(activate_payouts(stack.settings, seller))  # where the release pays
    status, _, body = call(
        worker, "POST", f"/api/escrow/{escrow_id}/release", token(stack, buyer), None, wait
    )
    assert status == 200, body
    assert body["settlement"]["kind"] == "RELEASE"
    assert body["settlement"]["status"] == "PENDING"
    assert body["settlement"]["destination"] == {
        "type": "stripe_account",
        "accountId": TEST_PAYOUTS["STRIPE"],
    }

    settled = wire_command(
        "ConfirmSettlement",
        escrow_id,
        SYSTEM,
        {
            "settlementId": body["settlement"]["settlementId"],
            "provider": "stripe",
            "providerReference": f"tr_{run}",
            "amount": "9500",
        },
    )
    asyncio.run(stack.send([settled]))

    final = escrow_when(stack, worker, buyer, escrow_id, lambda e: e["status"] == "RELEASED")
    assert final is not None and final["releasedAmount"] == "10000"

    async def history() -> Any:
        status, _, body = call(
            worker, "GET", f"/api/escrow/{escrow_id}/events", token(stack, buyer)
        )
        return body if status == 200 and len(body["events"]) == 5 else None

    events = asyncio.run(eventually(history, timeout_s=30))
    assert events is not None
    assert [e["type"] for e in events["events"]] == [
        "EscrowCreated",
        "EscrowFundsHeld",
        "EscrowDelivered",
        "SettlementRequested",
        "EscrowReleased",
    ]
    assert [e["version"] for e in events["events"]] == [1, 2, 3, 4, 5]


def test_wrong_party_and_roles_are_refused_before_acceptance(
    stack: Stack, worker: WorkerProcess
) -> None:
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"b-{run}", f"s-{run}"
    status, _, escrow = call(
        worker,
        "POST",
        "/api/escrow",
        token(stack, buyer),
        create_body(seller),
        {"Prefer": "wait=20"},
    )
    assert status == 201, escrow
    path = f"/api/escrow/{escrow['escrowId']}"
    cases = [
        ("deliver", token(stack, buyer), {}, 403),  # only the seller delivers
        ("deliver", token(stack, "stranger"), {}, 403),
        ("release", token(stack, seller), None, 403),
        ("dispute/resolve", token(stack, buyer), {"resolution": "REFUND", "reason": "x"}, 403),
        ("deliver", None, {}, 401),
    ]
    for suffix, bearer, body, want in cases:
        status, _, problem = call(worker, "POST", f"{path}/{suffix}", bearer, body)
        assert status == want, (suffix, problem)
    status, _, problem = call(
        worker, "POST", "/api/escrow", token(stack, "admin", Role.ADMIN), create_body(seller)
    )
    assert (status, problem["code"]) == (403, "NOT_AUTHORIZED")
    status, _, problem = call(
        worker, "POST", "/api/escrow", token(stack, buyer), {**create_body(seller), "amount": "-5"}
    )
    assert (status, problem["code"]) == (422, "VALIDATION_FAILED")
    assert problem["errors"]


def test_fifty_identical_posts_make_one_command(stack: Stack, worker: WorkerProcess) -> None:
    run = uuid.uuid4().hex[:8]
    buyer = f"b-{run}"
    key = {"Idempotency-Key": f"key-{run}"}
    bearer = token(stack, buyer)

    def post(_: int) -> tuple[int, Any]:
        status, _, body = call(worker, "POST", "/api/escrow", bearer, create_body(f"s-{run}"), key)
        return status, body

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(post, range(50)))
    assert {status for status, _ in results} == {202}, results
    assert all(body == results[0][1] for _, body in results)  # the same JSON content
    escrow_id = results[0][1]["escrowId"]

    async def outbox_rows() -> int:
        conn = await asyncpg.connect(stack.settings.database_url.get_secret_value())
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM outbox WHERE aggregate_id = $1", escrow_id
                )
            )
        finally:
            await conn.close()

    assert asyncio.run(outbox_rows()) == 1
    events = asyncio.run(stack.events(lambda es: any(e["escrowId"] == escrow_id for e in es)))
    assert [e["type"] for e in events if e["escrowId"] == escrow_id] == ["EscrowCreated"]

    status, _, problem = call(
        worker, "POST", "/api/escrow", bearer, create_body(f"s-{run}", amount=777), key
    )
    assert (status, problem["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
