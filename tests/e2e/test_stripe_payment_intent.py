"""On EscrowCreated the payments agent creates a PaymentIntent on stripe-mock; the buyer reads
its id on the escrow and its client secret from ``GET /api/escrow/{id}/payment``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.e2e.test_webhooks_stripe import deliver_signed, intent_succeeded
from tests.harness import Stack, WorkerProcess, activate_payouts, deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(
        tmp_path_factory.mktemp("stripe-pi"),
        PAYMENTS_EFFECTS_ENABLED="true",
        STRIPE_API_BASE="http://127.0.0.1:12111",
        STRIPE_WEBHOOK_SECRET=f"whsec_test_{uuid.uuid4().hex}",
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

    body = escrow_when(stack, process, buyer, escrow_id, lambda e: e.get("payment"), 60)
    assert body is not None, process.log_tail()
    payment = body["payment"]
    assert payment["provider"] == "stripe"
    assert payment["providerPaymentId"].startswith("pi_")
    assert "clientSecret" not in payment  # the snapshot never carries it (SPEC §10)
    path = f"/api/escrow/{escrow_id}/payment"
    status, _, mine = call(process, "GET", path, token(stack, buyer))
    assert status == 200, mine
    assert mine["providerPaymentId"] == payment["providerPaymentId"]
    assert mine["clientSecret"].startswith("pi_") and "_secret_" in mine["clientSecret"]

    events = asyncio.run(stack.events(lambda es: False, timeout_s=3))
    mine = [e for e in events if e["escrowId"] == escrow_id]
    assert [e["type"] for e in mine] == ["EscrowCreated", "PaymentInstructionsRecorded"]
    assert mine[1]["causationId"] == f"payments:instructions:{escrow_id}"


def funded_escrow(stack: Stack, process: WorkerProcess, buyer: str, seller: str) -> str:
    """Create over HTTP, wait for the PaymentIntent, pay it through the signed webhook; the
    seller has an ACTIVE payout account (``TEST_PAYOUTS``), so a release pays it."""
    asyncio.run(activate_payouts(stack.settings, seller))
    status, _, escrow = call(
        process,
        "POST",
        "/api/escrow",
        token(stack, buyer),
        create_body(seller),
        {"Prefer": "wait=30"},
    )
    assert status == 201, escrow
    escrow_id = escrow["escrowId"]

    def paid_by_stripe(wanted: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e["status"] == wanted and bool(e.get("payment"))

    instructed = escrow_when(stack, process, buyer, escrow_id, paid_by_stripe("AWAIT_FUNDS"), 60)
    assert instructed is not None
    intent = instructed["payment"]["providerPaymentId"]
    assert deliver_signed(stack, process, intent_succeeded(escrow_id, intent))[0] == 200
    assert escrow_when(stack, process, buyer, escrow_id, paid_by_stripe("FUNDS_HELD")) is not None
    return escrow_id


def test_release_transfers_the_payout_through_stripe(worker: tuple[Stack, WorkerProcess]) -> None:
    stack, process = worker
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"rel-b-{run}", f"rel-s-{run}"
    escrow_id = funded_escrow(stack, process, buyer, seller)
    wait = {"Prefer": "wait=30"}
    assert (
        call(process, "POST", f"/api/escrow/{escrow_id}/deliver", token(stack, seller), {}, wait)[0]
        == 200
    )
    assert (
        call(process, "POST", f"/api/escrow/{escrow_id}/release", token(stack, buyer), None, wait)[
            0
        ]
        == 200
    )
    released = escrow_when(
        stack, process, buyer, escrow_id, lambda e: e["status"] == "RELEASED", 60
    )
    assert released is not None, process.log_tail()
    assert released["releasedAmount"] == "10000"
    events = asyncio.run(stack.events(lambda es: False, timeout_s=3))
    released_events = [
        e for e in events if e["escrowId"] == escrow_id and e["type"] == "EscrowReleased"
    ]
    assert len({e["eventId"] for e in released_events}) == 1
    assert released_events[0]["data"]["providerReference"].startswith("tr_")
    assert released_events[0]["data"]["payoutAmount"] == "9500"  # amount - sellerFee


def test_refund_refunds_the_payment_intent(worker: tuple[Stack, WorkerProcess]) -> None:
    stack, process = worker
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"ref-b-{run}", f"ref-s-{run}"
    escrow_id = funded_escrow(stack, process, buyer, seller)
    assert (
        call(
            process,
            "POST",
            f"/api/escrow/{escrow_id}/refund",
            token(stack, seller),
            {"reason": "out of stock"},
            {"Prefer": "wait=30"},
        )[0]
        == 200
    )
    refunded = escrow_when(
        stack, process, buyer, escrow_id, lambda e: e["status"] == "REFUNDED", 60
    )
    assert refunded is not None, process.log_tail()
    events = asyncio.run(stack.events(lambda es: False, timeout_s=3))
    refund = [e for e in events if e["escrowId"] == escrow_id and e["type"] == "EscrowRefunded"]
    assert refund and refund[0]["data"]["providerReference"].startswith("re_")


def test_dispute_resolved_for_the_seller_transfers_the_payout(
    worker: tuple[Stack, WorkerProcess],
) -> None:
    stack, process = worker
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"dis-b-{run}", f"dis-s-{run}"
    escrow_id = funded_escrow(stack, process, buyer, seller)
    wait = {"Prefer": "wait=30"}
    steps = [
        (seller, Role.USER, "deliver", {}),
        (buyer, Role.USER, "dispute", {"reason": "not what was described"}),
        (
            f"admin-{run}",
            Role.ADMIN,
            "dispute/resolve",
            {"resolution": "RELEASE", "reason": "delivery matches the contract"},
        ),
    ]
    for user, role, action, body in steps:
        path = f"/api/escrow/{escrow_id}/{action}"
        status, _, answer = call(process, "POST", path, token(stack, user, role), body, wait)
        assert status == 200, (action, answer)
    released = escrow_when(
        stack, process, buyer, escrow_id, lambda e: e["status"] == "RELEASED", 60
    )
    assert released is not None, process.log_tail()
    events = asyncio.run(stack.events(lambda es: False, timeout_s=3))
    mine = [e for e in events if e["escrowId"] == escrow_id and e["type"] == "EscrowReleased"]
    assert len({e["eventId"] for e in mine}) == 1
    assert mine[0]["data"]["providerReference"].startswith("tr_")
    assert mine[0]["data"]["payoutAmount"] == "9500"
