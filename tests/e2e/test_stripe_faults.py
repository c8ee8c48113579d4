"""Provider faults on the Stripe rail, counted on the provider's side: whatever Stripe does to
an answer (lost after the transfer was made, 500s, too late), each settlement moves money at
most once and the escrow still ends settled.

The worker talks to :class:`~tests.standins.stripe_proxy.StripeProxy`, a test stand-in in
front of the real stripe-mock that adds Stripe's idempotency (which stripe-mock lacks) and
injects the faults; the proxy's log is the witness of what "Stripe" created.  Everything else
goes through HTTP and signed webhooks only.  The worker's SDK retries once per round
(``ESCROW_MAX_RETRIES=1``), its client gives up after 1.5 s, and the agent's own backoff
starts at 50 ms.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from escrow_stream.config import Settings
from escrow_stream.payments.stripe_rail import payment_intent_key
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.e2e.test_stripe_payment_intent import funded_escrow
from tests.harness import Stack, WorkerProcess, deployment, stripe_env
from tests.standins.stripe_proxy import StripeProxy

pytestmark = pytest.mark.integration

SETTLED_WAIT_S = 90.0  # the agent's backoff is real time
CLIENT_TIMEOUT_MS = 1500
WAIT = {"Prefer": "wait=30"}


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings, proxy: StripeProxy
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(
        tmp_path_factory.mktemp("stripe-faults"),
        **stripe_env(proxy.url, ESCROW_MAX_RETRIES="1", PROVIDER_TIMEOUT_MS=str(CLIENT_TIMEOUT_MS)),
    ) as running:
        yield running


def parties() -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]
    return f"fb-{run}", f"fs-{run}"


def release(stack: Stack, process: WorkerProcess, escrow_id: str, buyer: str, seller: str) -> None:
    path = f"/api/escrow/{escrow_id}"
    assert call(process, "POST", f"{path}/deliver", token(stack, seller), {}, WAIT)[0] == 200
    assert call(process, "POST", f"{path}/release", token(stack, buyer), None, WAIT)[0] == 200


def refund(stack: Stack, process: WorkerProcess, escrow_id: str, seller: str) -> None:
    body = {"reason": "out of stock"}
    path = f"/api/escrow/{escrow_id}/refund"
    assert call(process, "POST", path, token(stack, seller), body, WAIT)[0] == 200


def settled(
    stack: Stack, process: WorkerProcess, buyer: str, escrow_id: str, status: str
) -> dict[str, Any]:
    body = escrow_when(
        stack, process, buyer, escrow_id, lambda e: e["status"] == status, SETTLED_WAIT_S
    )
    assert body is not None, process.log_tail()
    return body


def events_of(stack: Stack, escrow_id: str) -> list[dict[str, Any]]:
    events = asyncio.run(stack.events(lambda es: False, timeout_s=3))
    return [e for e in events if e["escrowId"] == escrow_id]


def only(events: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    """The one event of ``type_`` (by eventId: a redelivered copy is the same event)."""
    found = {e["eventId"]: e for e in events if e["type"] == type_}
    assert len(found) == 1, [e["type"] for e in events]
    return next(iter(found.values()))


def created_once(proxy: StripeProxy, prefix: str, escrow_id: str, key: str) -> dict[str, Any]:
    """On the provider's side: every request for the escrow carried ``key``, exactly one
    object was created, and no request reused the key with other parameters; that object."""
    requests = proxy.requests(prefix, escrow_id)
    assert {e.key for e in requests} == {key}, requests
    assert proxy.created_keys(prefix, escrow_id) == {key}, requests
    assert not [e for e in requests if e.action == "conflict"], requests
    assert proxy.pending_faults() == 0, "a programmed fault was never hit"
    stored = proxy.stored_answer(key)
    assert stored is not None
    return dict(json.loads(stored))


def test_release_whose_transfer_answer_is_lost_twice_transfers_once(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties()
    escrow_id = funded_escrow(stack, process, buyer, seller)

    proxy.lose_response("/v1/transfers", 2)  # made, then the connection drops unanswered
    release(stack, process, escrow_id, buyer, seller)
    assert settled(stack, process, buyer, escrow_id, "RELEASED")["releasedAmount"] == "10000"

    events = events_of(stack, escrow_id)
    key = only(events, "SettlementRequested")["escrow"]["settlement"]["settlementId"]
    assert key == f"escrow-release:{escrow_id}:all:1"
    transfer = created_once(proxy, "/v1/transfers", escrow_id, key)
    requests = proxy.requests("/v1/transfers", escrow_id)
    assert [(e.action, e.fault) for e in requests][:3] == [
        ("forwarded", "lose"),
        ("replayed", "lose"),
        ("replayed", None),
    ]
    released = only(events, "EscrowReleased")
    assert released["data"]["providerReference"] == transfer["id"]
    assert released["data"]["payoutAmount"] == "9500" == str(transfer["amount"])


def test_release_after_three_500s_transfers_once(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties()
    escrow_id = funded_escrow(stack, process, buyer, seller)

    proxy.fail("/v1/transfers", 3)  # answered 500 api_error, never forwarded
    release(stack, process, escrow_id, buyer, seller)
    settled(stack, process, buyer, escrow_id, "RELEASED")

    events = events_of(stack, escrow_id)
    key = only(events, "SettlementRequested")["escrow"]["settlement"]["settlementId"]
    transfer = created_once(proxy, "/v1/transfers", escrow_id, key)
    requests = proxy.requests("/v1/transfers", escrow_id)
    assert [e.action for e in requests][:4] == ["failed"] * 3 + ["forwarded"]
    assert only(events, "EscrowReleased")["data"]["providerReference"] == transfer["id"]
    assert not [e for e in events if e["type"] == "SettlementFailed"]


def test_refund_answered_after_the_client_timeout_refunds_once(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties()
    escrow_id = funded_escrow(stack, process, buyer, seller)

    proxy.delay("/v1/refunds", 1, seconds=2 * CLIENT_TIMEOUT_MS / 1000)  # made, answered late
    refund(stack, process, escrow_id, seller)
    settled(stack, process, buyer, escrow_id, "REFUNDED")

    events = events_of(stack, escrow_id)
    key = only(events, "SettlementRequested")["escrow"]["settlement"]["settlementId"]
    assert key == f"escrow-refund:{escrow_id}:all:1"
    made = created_once(proxy, "/v1/refunds", escrow_id, key)
    requests = proxy.requests("/v1/refunds", escrow_id)
    assert [(e.action, e.fault) for e in requests][:2] == [
        ("forwarded", "delay"),
        ("replayed", None),
    ]
    assert only(events, "EscrowRefunded")["data"]["providerReference"] == made["id"]
    assert not [e for e in events if e["type"] == "SettlementFailed"]


def test_payment_intent_after_500s_is_created_and_recorded_once(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties()
    proxy.fail("/v1/payment_intents", 3)
    escrow_id = funded_escrow(stack, process, buyer, seller)  # pays through the webhook too

    intent = created_once(proxy, "/v1/payment_intents", escrow_id, payment_intent_key(escrow_id))
    requests = proxy.requests("/v1/payment_intents", escrow_id)
    assert [e.action for e in requests][:4] == ["failed"] * 3 + ["forwarded"]
    events = events_of(stack, escrow_id)
    recorded = only(events, "PaymentInstructionsRecorded")
    assert recorded["causationId"] == f"payments:instructions:{escrow_id}"
    held = escrow_when(stack, process, buyer, escrow_id, lambda e: e["status"] == "FUNDS_HELD")
    assert held is not None and held["payment"]["providerPaymentId"] == intent["id"]
