"""SPEC §10 on a live worker, with stripe-mock behind the counting fault proxy: provider
refusals become recorded outcomes and hold nobody back, a stale settlement result is refused
SETTLEMENT_MISMATCH, re-reading the events topic calls no provider, amounts and payout fields
are checked at the door, and the client secret reaches the buyer alone.

KYC gating stays on (the seed's default): every party is verified through ``PUT /api/kyc``.
The worker's SDK does not retry inside a round (``ESCROW_MAX_RETRIES=0``), so each injected
500 costs one scheduled retry, from 50 ms doubling.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from escrow_stream.agents.effect_rules import wanted_effect
from escrow_stream.agents.payment_effects import PaymentEffects
from escrow_stream.agents.relay import OutboxPublisher
from escrow_stream.clock import utc_now
from escrow_stream.config import Settings
from escrow_stream.db import effects
from escrow_stream.db.pool import Database
from escrow_stream.domain import parse_event
from escrow_stream.kafka import client_kwargs, topic_partitions
from escrow_stream.payments.stripe_rail import StripeRail
from escrow_stream.web.auth import Role
from tests.builders import wire_command
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.e2e.test_stripe_payment_intent import funded_escrow
from tests.e2e.test_webhooks_stripe import deliver, deliver_signed, intent_succeeded, sign
from tests.harness import (
    Stack,
    WorkerProcess,
    deployment,
    eventually,
    mirrored_snapshots,
    stripe_env,
)
from tests.standins.stripe_proxy import StripeProxy

pytestmark = pytest.mark.integration

WAIT = {"Prefer": "wait=30"}
SETTLED_WAIT_S = 90.0
OTHERS = 50
SERVICE = {"id": "marketplace", "role": "service"}
SYSTEM = {"id": "payments-agent", "role": "system"}
USD_MAX = 200_000_000  # above Stripe's 99,999,999 cap, so the cap is what refuses
USDC_MAX = 5_000_000  # 5 USDC


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings, proxy: StripeProxy
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(
        tmp_path_factory.mktemp("payment-effects"),
        **stripe_env(
            proxy.url,
            FEATURE_KYC_GATING="true",
            ESCROW_MAX_AMOUNT_USD_MINOR=str(USD_MAX),
            ESCROW_MAX_AMOUNT_USDC_MINOR=str(USDC_MAX),
        ),
    ) as running:
        yield running


def verified(stack: Stack, process: WorkerProcess, *users: str) -> None:
    admin = token(stack, "kyc-admin", Role.ADMIN)
    for user in users:
        path = f"/api/kyc/{user}"
        assert call(process, "PUT", path, admin, {"status": "VERIFIED"})[0] == 200


def parties(stack: Stack, process: WorkerProcess) -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"pe-b-{run}", f"pe-s-{run}"
    verified(stack, process, buyer, seller)
    return buyer, seller


def service_create(escrow_id: str, buyer: str, seller: str, amount: int = 10_000) -> dict[str, Any]:
    """CreateEscrow as a marketplace back end produces it on Kafka."""
    payload = {
        "offerId": f"offer-{escrow_id}",
        "contractId": f"contract-{escrow_id}",
        "buyerId": buyer,
        "sellerId": seller,
        "rail": "STRIPE",
        "amount": str(amount),
        "currency": "USD",
    }
    return wire_command("CreateEscrow", escrow_id, SERVICE, payload)


def ids_on_one_partition(partitions: int, n: int) -> list[str]:
    """``n`` escrow ids whose events land on the same partition of the events topic."""
    partitioner = DefaultPartitioner()
    everything = list(range(partitions))
    target, found = None, []
    while len(found) < n:
        escrow_id = f"esc-{uuid.uuid4().hex[:12]}"
        partition = partitioner(escrow_id.encode(), everything, everything)
        target = partition if target is None else target
        if partition == target:
            found.append(escrow_id)
    return found


def of(escrow_id: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in items if i["escrowId"] == escrow_id]


def types_of(escrow_id: str, events: list[dict[str, Any]]) -> set[str]:
    return {e["type"] for e in of(escrow_id, events)}


async def effect_row(settings: Settings, key: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        return await effects.get(conn, key)
    finally:
        await conn.close()


def test_refusal_and_transient_failure_hold_back_no_other_escrow_of_their_partition(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    events_topic = stack.settings.kafka_events_topic
    partition_count = len(asyncio.run(topic_partitions(stack.settings, events_topic)))
    refused_id, failing_id, *others = ids_on_one_partition(partition_count, 2 + OTHERS)
    proxy.fail(
        "/v1/payment_intents",
        1,
        status=400,
        key_contains=refused_id,
        error_type="invalid_request_error",
        code="amount_too_large",
    )
    proxy.fail("/v1/payment_intents", 10_000, key_contains=failing_id)  # until cleared

    everyone = [refused_id, failing_id, *others]
    asyncio.run(stack.send([service_create(e, buyer, seller) for e in everyone]))

    def instructed(events: list[dict[str, Any]]) -> bool:
        return all("PaymentInstructionsRecorded" in types_of(e, events) for e in others) and (
            "PaymentFailed" in types_of(refused_id, events)
        )

    events = asyncio.run(stack.events(instructed, timeout_s=SETTLED_WAIT_S))
    assert instructed(events), process.log_tail()
    # the failing escrow, first in the partition, is still being retried meanwhile
    assert "PaymentInstructionsRecorded" not in types_of(failing_id, events)
    assert len(proxy.requests("/v1/payment_intents", failing_id)) >= 2
    partitions = {r.partition for r in asyncio.run(_event_records(stack, set(everyone)))}
    assert len(partitions) == 1  # all of them on one partition of the events topic

    (failure,) = [e for e in of(refused_id, events) if e["type"] == "PaymentFailed"]
    assert failure["data"]["errorCode"] == "amount_too_large"
    assert failure["escrow"]["status"] == "AWAIT_FUNDS"
    assert len(proxy.requests("/v1/payment_intents", refused_id)) == 1  # never retried
    row = asyncio.run(effect_row(stack.settings, f"instructions:{refused_id}"))
    assert row is not None and (row["state"], row["error_code"]) == ("FAILED", "amount_too_large")

    proxy.clear_faults()  # the provider is back: the same key, one PaymentIntent
    events = asyncio.run(
        stack.events(
            lambda es: "PaymentInstructionsRecorded" in types_of(failing_id, es),
            timeout_s=SETTLED_WAIT_S,
        )
    )
    assert "PaymentInstructionsRecorded" in types_of(failing_id, events), process.log_tail()
    keys = {e.key for e in proxy.requests("/v1/payment_intents", failing_id)}
    assert keys == {f"escrow-payment-intent:{failing_id}"}
    assert len(proxy.created_keys("/v1/payment_intents", failing_id)) == 1
    for escrow_id in others:
        assert len(proxy.created_keys("/v1/payment_intents", escrow_id)) == 1

    # the buyer sees the refusal where the client secret would be
    status, _, payment = call(
        process, "GET", f"/api/escrow/{refused_id}/payment", token(stack, buyer)
    )
    assert (status, payment["status"], payment["errorCode"]) == (200, "FAILED", "amount_too_large")


async def _event_records(stack: Stack, escrow_ids: set[str]) -> list[Any]:
    records = await stack.read(stack.settings.kafka_events_topic, lambda rs: False, timeout_s=3)
    return [r for r in records if r.key.decode() in escrow_ids]


def test_a_stale_settlement_result_is_refused_and_the_pending_one_completes(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id = funded_escrow(stack, process, buyer, seller)
    first, second = (f"escrow-refund:{escrow_id}:all:{n}" for n in (1, 2))
    proxy.fail(
        "/v1/refunds",
        1,
        status=400,
        key_contains=first,
        error_type="invalid_request_error",
        code="charge_disputed",
    )
    proxy.fail("/v1/refunds", 10_000, key_contains=second)  # attempt 2 stays pending
    path = f"/api/escrow/{escrow_id}/refund"
    body = {"reason": "out of stock"}
    assert call(process, "POST", path, token(stack, seller), body, WAIT)[0] == 200

    def failed_once(e: dict[str, Any]) -> bool:
        return e["settlement"] is None and e["settlementAttempts"] == 1

    assert escrow_when(stack, process, buyer, escrow_id, failed_once, SETTLED_WAIT_S)
    events = asyncio.run(stack.events(lambda es: "SettlementFailed" in types_of(escrow_id, es)))
    (failed,) = [e for e in of(escrow_id, events) if e["type"] == "SettlementFailed"]
    assert (failed["data"]["errorCode"], failed["data"]["retryable"]) == ("charge_disputed", False)
    assert len(proxy.requests("/v1/refunds", first)) == 1  # a refusal is never retried

    assert call(process, "POST", path, token(stack, seller), body, WAIT)[0] == 200
    pending = escrow_when(
        stack, process, buyer, escrow_id, lambda e: (e["settlement"] or {}).get("attempt") == 2
    )
    assert pending is not None and pending["settlement"]["settlementId"] == second

    # late results for attempt 1: the agent's kind on Kafka, and Stripe's transfer.created
    late = {"settlementId": first, "provider": "stripe", "providerReference": "re_late"}
    stale = wire_command("ConfirmSettlement", escrow_id, SYSTEM, {**late, "amount": "10000"})
    asyncio.run(stack.send([stale]))
    secret = stack.settings.stripe_webhook_secret.get_secret_value()
    transfer = _stripe_event(
        "transfer.created",
        {
            "id": f"tr_{uuid.uuid4().hex[:8]}",
            "object": "transfer",
            "amount": 9500,
            "transfer_group": escrow_id,
            "metadata": {
                "escrow_id": escrow_id,
                "settlement_id": f"escrow-release:{escrow_id}:all:1",
            },
        },
    )
    assert deliver(process, transfer, sign(secret, transfer, int(time.time())))[0] == 200

    def mismatches(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of(escrow_id, rs) if r["code"] == "SETTLEMENT_MISMATCH"]

    rejections = asyncio.run(stack.rejections(lambda rs: len(mismatches(rs)) >= 2))
    assert {r["commandId"] for r in mismatches(rejections)} == {
        stale["commandId"],
        f"payments:settled:escrow-release:{escrow_id}:all:1",
    }
    unchanged = escrow_when(stack, process, buyer, escrow_id, lambda e: True)
    assert unchanged == pending  # the pending refund is untouched
    status, _, metrics = call(process, "GET", "/metrics")
    assert status == 200
    assert 'escrow_settlement_mismatches_total{type="ConfirmSettlement"} 2.0' in metrics

    proxy.clear_faults()
    refunded = escrow_when(
        stack, process, buyer, escrow_id, lambda e: e["status"] == "REFUNDED", SETTLED_WAIT_S
    )
    assert refunded is not None, process.log_tail()
    assert proxy.created_keys("/v1/refunds", escrow_id) == {second}
    events = asyncio.run(stack.events(lambda es: "EscrowRefunded" in types_of(escrow_id, es)))
    (done,) = {
        e["eventId"]: e for e in of(escrow_id, events) if e["type"] == "EscrowRefunded"
    }.values()
    assert done["data"]["attempt"] == 2


def _stripe_event(kind: str, obj: dict[str, Any]) -> bytes:
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": kind,
        "data": {"object": obj},
    }
    return json.dumps(event).encode()


def test_the_client_secret_reaches_the_buyer_alone(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    status, _, escrow = call(
        process, "POST", "/api/escrow", token(stack, buyer), create_body(seller), WAIT
    )
    assert status == 201, escrow
    escrow_id = escrow["escrowId"]
    path = f"/api/escrow/{escrow_id}/payment"

    def answered() -> dict[str, Any] | None:
        status, _, body = call(process, "GET", path, token(stack, buyer))
        return body if status == 200 and body["status"] == "SUCCEEDED" else None

    mine = asyncio.run(eventually(answered, timeout_s=60))
    assert mine is not None, process.log_tail()
    stored = proxy.stored_answer(f"escrow-payment-intent:{escrow_id}")
    assert stored is not None
    secret = json.loads(stored)["client_secret"]
    assert mine["clientSecret"] == secret and mine["providerPaymentId"] == json.loads(stored)["id"]

    for who, role in ((seller, Role.USER), ("ops", Role.ADMIN), ("marketplace", Role.SERVICE)):
        assert call(process, "GET", path, token(stack, who, role))[0] == 403
    seen = escrow_when(stack, process, seller, escrow_id, lambda e: e.get("payment"))
    assert seen is not None and secret not in json.dumps(seen)
    events = asyncio.run(stack.events(lambda es: len(of(escrow_id, es)) >= 2))
    assert of(escrow_id, events) and secret not in json.dumps(of(escrow_id, events))

    async def mirrored() -> Any:
        rows = await mirrored_snapshots(stack.settings, [escrow_id])
        return rows.get(escrow_id) if rows.get(escrow_id, {}).get("payment") else None

    snapshot = asyncio.run(eventually(mirrored, timeout_s=30))
    assert snapshot is not None and secret not in json.dumps(snapshot)
    history = call(process, "GET", f"/api/escrow/{escrow_id}/events", token(stack, buyer))[2]
    assert secret not in json.dumps(history)


def test_amounts_and_payout_fields_are_checked_at_the_door(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    user, service = token(stack, buyer), token(stack, "marketplace", Role.SERVICE)

    def create(bearer: str, **fields: Any) -> tuple[int, dict[str, Any]]:
        status, _, body = call(
            process, "POST", "/api/escrow", bearer, {**create_body(seller), **fields}
        )
        return status, body

    def fields_of(body: dict[str, Any]) -> list[str]:
        return [e["field"] for e in body.get("errors") or []]

    for field, value in (("sellerAccountId", "acct_mine"), ("sellerFee", "0")):
        status, body = create(user, **{field: value})
        assert (status, body["code"], fields_of(body)) == (422, "VALIDATION_FAILED", [field])
    status, body = create(service, buyerId=buyer, sellerAccountId="acct_mine")
    assert (status, fields_of(body)) == (422, ["sellerAccountId"])
    for fee in ("10001", "-1"):
        status, body = create(service, buyerId=buyer, sellerFee=fee)
        assert status == 422 and any(f.endswith("sellerFee") for f in fields_of(body)), body
    status, body = create(service, buyerId=buyer, sellerFee="10000")  # = amount: allowed
    assert status == 202, body

    status, body = create(user, amount="100000000")  # Stripe's cap, under our USD limit
    assert (status, fields_of(body)) == (422, ["amount"]), body
    assert create(user, amount="99999999")[0] == 202
    usdc = {"rail": "USDC_BASE", "currency": "USDC"}
    status, body = create(user, amount=str(USDC_MAX + 1), **usdc)
    assert (status, fields_of(body)) == (422, ["amount"]), body

    # on the stream: rejected, and the payments agent never sees it
    escrow_id = f"esc-{uuid.uuid4().hex[:12]}"
    asyncio.run(stack.send([service_create(escrow_id, buyer, seller, amount=100_000_000)]))
    rejections = asyncio.run(stack.rejections(lambda rs: bool(of(escrow_id, rs))))
    assert [r["code"] for r in of(escrow_id, rejections)] == ["VALIDATION_FAILED"]
    assert proxy.requests("/v1/payment_intents", escrow_id) == []


def test_replaying_every_event_through_a_new_consumer_group_calls_no_provider(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    """Every escrow of the module so far, plus one refused and one refunded here."""
    stack, process = worker
    buyer, seller = parties(stack, process)
    refused_id = f"esc-{uuid.uuid4().hex[:12]}"
    proxy.fail(
        "/v1/payment_intents",
        1,
        status=400,
        key_contains=refused_id,
        error_type="invalid_request_error",
        code="parameter_invalid_integer",
    )
    asyncio.run(stack.send([service_create(refused_id, buyer, seller)]))
    assert asyncio.run(stack.events(lambda es: "PaymentFailed" in types_of(refused_id, es)))
    escrow_id = funded_escrow(stack, process, buyer, seller)
    path = f"/api/escrow/{escrow_id}/refund"
    assert call(process, "POST", path, token(stack, seller), {"reason": "x"}, WAIT)[0] == 200
    refunded = escrow_when(
        stack, process, buyer, escrow_id, lambda e: e["status"] == "REFUNDED", SETTLED_WAIT_S
    )
    assert refunded is not None, process.log_tail()
    time.sleep(1.0)  # let the mirror catch up with the last events
    calls_before = len(proxy.log)
    total = len(asyncio.run(stack.events(lambda es: False, timeout_s=3)))

    new, seen, states = asyncio.run(_replay(stack.settings))

    assert seen == total  # the whole topic
    assert new == 0  # every effect was recorded already
    # and finished: even with no mirror to tell old events apart, none would be made again
    assert states and set(states.values()) <= {"SUCCEEDED", "FAILED"}, states
    assert "SUCCEEDED" in states.values() and "FAILED" in states.values()
    assert len(proxy.log) == calls_before  # zero provider calls, counted at the provider


async def _caught_up(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


async def _replay(settings: Settings) -> tuple[int, int, dict[str, str]]:
    """Every event from the start through a fresh consumer group into the agent's handler,
    then its runner; (effects newly recorded, events seen, state of every effect asked for)."""
    database = Database(settings)
    publisher = OutboxPublisher(settings, database, utc_now)
    payments = PaymentEffects(
        settings, utc_now, database, {"STRIPE": StripeRail(settings)}, publisher
    )
    topic = settings.kafka_events_topic
    consumer = AIOKafkaConsumer(
        topic,
        group_id=f"payments-replay-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **client_kwargs(settings),
    )
    await consumer.start()
    new = seen = 0
    wanted: set[str] = set()
    try:
        parts = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
        ends = await consumer.end_offsets(parts)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            for batch in batches.values():
                for record in batch:
                    seen += 1
                    raw = json.loads(record.value)
                    event = parse_event(raw)
                    new += await payments.on_event(event, raw)
                    if event.escrow.rail == "STRIPE" and (found := wanted_effect(event)):
                        wanted.add(found[0])
            assigned = consumer.assignment()
            if len(assigned) == len(parts) and await _caught_up(consumer, ends):
                break
        await payments.run_due()
        await payments.drain()
        pool = await database.pool()
        states = {key: (await effects.get(pool, key) or {}).get("state", "-") for key in wanted}
    finally:
        await consumer.stop()
        await database.close()
    return new, seen, states


# -- unmatched funds (SPEC §10): money no escrow accepts is returned, once ------------------


def intent_of(stack: Stack, process: WorkerProcess, buyer: str, seller: str) -> tuple[str, str]:
    """A STRIPE escrow created over HTTP and its PaymentIntent (not paid)."""
    status, _, escrow = call(
        process, "POST", "/api/escrow", token(stack, buyer), create_body(seller), WAIT
    )
    assert status == 201, escrow
    escrow_id = escrow["escrowId"]
    instructed = escrow_when(stack, process, buyer, escrow_id, lambda e: e.get("payment"), 60)
    assert instructed is not None, process.log_tail()
    return escrow_id, instructed["payment"]["providerPaymentId"]


def pay_webhook(stack: Stack, process: WorkerProcess, body: bytes) -> None:
    status, answer = deliver_signed(stack, process, body)
    assert status == 200, answer


def unmatched_row(stack: Stack, intent: str, status: str) -> dict[str, Any] | None:
    async def reached() -> dict[str, Any] | None:
        conn = await asyncpg.connect(stack.settings.database_url.get_secret_value())
        try:
            row = await conn.fetchrow(
                "SELECT * FROM unmatched_funds WHERE provider = 'stripe'"
                " AND provider_object_id = $1",
                intent,
            )
        finally:
            await conn.close()
        return dict(row) if row is not None and row["status"] == status else None

    return asyncio.run(eventually(reached, 60))


def funds_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [sys.executable, "-m", "escrow_stream.cli", "funds", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def refunds_sent(proxy: StripeProxy, intent: str) -> list[Any]:
    return [
        e
        for e in proxy.requests("/v1/refunds", f"unmatched:stripe:{intent}")
        if e.action == "forwarded" and e.status == 200
    ]


def test_cancel_before_funding_cancels_the_intent_and_a_late_payment_is_refunded_once(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id, intent = intent_of(stack, process, buyer, seller)

    status, _, cancelled = call(
        process, "POST", f"/api/escrow/{escrow_id}/cancel", token(stack, buyer), {}, WAIT
    )
    assert status == 200 and cancelled["status"] == "CANCELLED", cancelled
    cancel_path = f"/v1/payment_intents/{intent}/cancel"

    def cancelled_at_stripe() -> list[Any]:
        return [
            e
            for e in proxy.requests(cancel_path, f"escrow-payment-intent-cancel:{escrow_id}")
            if e.action == "forwarded" and e.status == 200
        ]

    assert len(asyncio.run(eventually(cancelled_at_stripe, 30))) == 1, process.log_tail()

    # the buyer's bank completed the payment anyway: Stripe says so three times, then once
    # more as another event
    body = intent_succeeded(escrow_id, intent)
    for _ in range(3):
        pay_webhook(stack, process, body)
    pay_webhook(stack, process, intent_succeeded(escrow_id, intent))
    returned = unmatched_row(stack, intent, "RETURNED")
    assert returned is not None, process.log_tail()
    assert (returned["escrow_id"], returned["reason"]) == (escrow_id, "INVALID_TRANSITION")
    assert (returned["amount"], returned["currency"]) == (10_000, "USD")
    time.sleep(1.5)  # a second refund would have been sent by now
    sent = refunds_sent(proxy, intent)
    assert len(sent) == 1, sent
    assert returned["return_reference"].startswith("re_")
    assert len(cancelled_at_stripe()) == 1  # the cancellation too was made once

    admin = token(stack, f"admin-{buyer}", Role.ADMIN)
    status, _, listing = call(
        process, "GET", f"/api/admin/unmatched-funds?escrowId={escrow_id}", admin
    )
    assert status == 200, listing
    assert [(i["fundsId"], i["status"], i["amount"]) for i in listing["items"]] == [
        (f"stripe:{intent}", "RETURNED", "10000")
    ]
    assert call(process, "GET", "/api/admin/unmatched-funds", token(stack, buyer))[0] == 403
    bad = call(process, "GET", "/api/admin/unmatched-funds?status=LOST", admin)
    assert bad[0] == 422 and bad[2]["code"] == "VALIDATION_FAILED", bad

    listed = funds_cli(stack, "list", "--json", "--escrow-id", escrow_id)
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["status"] for line in listed.stdout.splitlines()] == ["RETURNED"]
    again = funds_cli(stack, "retry", f"stripe:{intent}")
    assert again.returncode == 1 and "RETURNED" in again.stderr, again


def test_a_refused_refund_waits_for_review_and_an_operator_retry_returns_it(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id, intent = intent_of(stack, process, buyer, seller)
    status, _, _ = call(
        process, "POST", f"/api/escrow/{escrow_id}/cancel", token(stack, buyer), {}, WAIT
    )
    assert status == 200
    proxy.fail(
        "/v1/refunds",
        1,
        status=400,
        key_contains=f"unmatched:stripe:{intent}",
        error_type="invalid_request_error",
        code="charge_disputed",
    )
    pay_webhook(stack, process, intent_succeeded(escrow_id, intent))
    review = unmatched_row(stack, intent, "NEEDS_REVIEW")
    assert review is not None, process.log_tail()
    assert "charge_disputed" in (review["last_error"] or ""), review
    assert refunds_sent(proxy, intent) == []

    table = funds_cli(stack, "list", "--status", "NEEDS_REVIEW")
    assert table.returncode == 0 and f"stripe:{intent}" in table.stdout, table
    retried = funds_cli(stack, "retry", f"stripe:{intent}")
    assert retried.returncode == 0, retried.stderr
    assert unmatched_row(stack, intent, "RETURNED") is not None, process.log_tail()
    assert len(refunds_sent(proxy, intent)) == 1
