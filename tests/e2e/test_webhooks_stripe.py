"""Stripe webhooks on a live worker, signed with Stripe's scheme: ``t=<unix>,v1=<hex HMAC-SHA256
of "<t>.<raw body>" keyed with the endpoint secret>``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from escrow_stream.config import Settings
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.harness import Stack, WorkerProcess, deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(
        tmp_path_factory.mktemp("stripe"), STRIPE_WEBHOOK_SECRET=f"whsec_test_{uuid.uuid4().hex}"
    ) as running:
        yield running


def sign(secret: str, body: bytes, at: int) -> str:
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def deliver(
    process: WorkerProcess, body: bytes, signature: str | None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{process.port}/api/webhooks/stripe",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            **({"Stripe-Signature": signature} if signature else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def event(kind: str, obj: dict[str, Any], event_id: str | None = None) -> bytes:
    return json.dumps(
        {
            "id": event_id or f"evt_{uuid.uuid4().hex}",
            "object": "event",
            "type": kind,
            "data": {"object": obj},
        }
    ).encode()


def intent_succeeded(
    escrow_id: str, intent: str, amount: int = 10_000, event_id: str | None = None
) -> bytes:
    """Stripe's ``payment_intent.succeeded`` for the escrow's PaymentIntent."""
    obj = {
        "id": intent,
        "object": "payment_intent",
        "amount": amount,
        "amount_received": amount,
        "currency": "usd",
        "status": "succeeded",
        "metadata": {"escrow_id": escrow_id},
    }
    return event("payment_intent.succeeded", obj, event_id)


def deliver_signed(stack: Stack, process: WorkerProcess, body: bytes) -> tuple[int, dict[str, Any]]:
    """``body`` as Stripe sends it: signed now with the deployment's webhook secret."""
    secret = stack.settings.stripe_webhook_secret.get_secret_value()
    return deliver(process, body, sign(secret, body, int(time.time())))


def test_webhooks_drive_the_escrow_once_and_refuse_bad_signatures(
    worker: tuple[Stack, WorkerProcess],
) -> None:
    stack, process = worker
    secret = stack.settings.stripe_webhook_secret.get_secret_value()
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"wb-{run}", f"ws-{run}"
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
    succeeded = event(
        "payment_intent.succeeded",
        {
            "id": f"pi_{run}",
            "object": "payment_intent",
            "amount": 10000,
            "amount_received": 10000,
            "currency": "usd",
            "metadata": {"escrow_id": escrow_id},
        },
    )
    now = int(time.time())

    # attacks: nothing changes, 400, never 5xx
    tampered = succeeded.replace(b"10000", b"99999")
    refused = [
        deliver(process, succeeded, None),
        deliver(process, succeeded, sign("whsec_wrong", succeeded, now)),
        deliver(process, tampered, sign(secret, succeeded, now)),
        deliver(process, succeeded, sign(secret, succeeded, now - 301)),  # replayed too late
        deliver(process, succeeded, sign(secret, succeeded, now + 301)),  # from the future
    ]
    assert [(s, b["code"]) for s, b in refused] == [(400, "INVALID_SIGNATURE")] * 5

    # an event out of order first: a transfer before any release changes nothing
    early = event(
        "transfer.created",
        {
            "id": f"tr_{run}",
            "object": "transfer",
            "amount": 9500,
            "transfer_group": escrow_id,
            "metadata": {"settlement_id": f"escrow-release:{escrow_id}:all:1"},
        },
    )
    assert deliver(process, early, sign(secret, early, now))[0] == 200

    # the same event five times: one effect
    answers = [deliver(process, succeeded, sign(secret, succeeded, now)) for _ in range(5)]
    assert {s for s, _ in answers} == {200}
    assert len({json.dumps(b, sort_keys=True) for _, b in answers}) == 1

    held = escrow_when(stack, process, buyer, escrow_id, lambda e: e["status"] == "FUNDS_HELD")
    assert held is not None and held["payment"]["fundedProviderPaymentId"] == f"pi_{run}"
    events = asyncio.run(stack.events(lambda es: False, timeout_s=3))
    mine = {e["eventId"]: e["type"] for e in events if e["escrowId"] == escrow_id}
    assert sorted(mine.values()) == ["EscrowCreated", "EscrowFundsHeld"]
    rejections = asyncio.run(stack.rejections(lambda rs: False, timeout_s=2))
    assert [r["code"] for r in rejections if r["escrowId"] == escrow_id] == [
        "SETTLEMENT_MISMATCH"  # the early transfer: its settlement is not pending
    ]

    ignored = event("customer.created", {"id": "cus_1", "object": "customer"})
    status, body = deliver(process, ignored, sign(secret, ignored, now))
    assert (status, body["ignored"]) == (200, "customer.created")
