"""SPEC §10 chargebacks on a live worker: Stripe's signed ``charge.dispute.*`` webhooks, found
by their PaymentIntent in our own records; an open chargeback refuses every release (HTTP 409
and on the stream) and holds a settlement not yet sent; won lets the escrow continue; lost on
held funds ends it REFUNDED with no Stripe refund; after a release it is ledger only.

KYC gating stays on (the seed's default): every party is verified through ``PUT /api/kyc``.
What moved is counted at the Stripe fault proxy in front of stripe-mock; the events are read
from the PostgreSQL mirror (the full history; the events topic is compacted).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest

from escrow_stream.config import Settings
from escrow_stream.db.queries import stuck_escrows
from escrow_stream.domain import Escrow, check_invariants, ledger_balances
from escrow_stream.web.auth import Role
from tests.builders import wire_command
from tests.e2e.test_http_reads import call, token
from tests.e2e.test_stripe_payment_intent import funded_escrow
from tests.e2e.test_webhooks_stripe import deliver, sign
from tests.harness import Stack, WorkerProcess, deployment, stripe_env
from tests.standins.stripe_proxy import StripeProxy

pytestmark = pytest.mark.integration

WAIT = {"Prefer": "wait=30"}
AMOUNT = 10_000
T = TypeVar("T")
SETTLED_WAIT_S = 60.0


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings, proxy: StripeProxy
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(
        tmp_path_factory.mktemp("chargebacks"),
        **stripe_env(proxy.url, FEATURE_KYC_GATING="true"),
    ) as running:
        yield running


# -- helpers ------------------------------------------------------------------------------


def parties(stack: Stack, process: WorkerProcess) -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"cb-b-{run}", f"cb-s-{run}"
    admin = token(stack, "kyc-admin", Role.ADMIN)
    for user in (buyer, seller):
        assert call(process, "PUT", f"/api/kyc/{user}", admin, {"status": "VERIFIED"})[0] == 200
    return buyer, seller


def act(
    stack: Stack, process: WorkerProcess, user: str, escrow_id: str, action: str, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    path = f"/api/escrow/{escrow_id}/{action}"
    return call(process, "POST", path, token(stack, user), body, WAIT)


def dispute_body(kind: str, intent: str, dispute_id: str, status: str) -> bytes:
    """A Stripe Dispute event as Stripe sends it: no escrow metadata, the PaymentIntent."""
    dispute = {
        "id": dispute_id,
        "object": "dispute",
        "amount": AMOUNT,
        "currency": "usd",
        "charge": f"ch_{dispute_id}",
        "payment_intent": intent,
        "reason": "fraudulent",
        "status": status,
        "metadata": {},
    }
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": kind,
        "data": {"object": dispute},
    }
    return json.dumps(event).encode()


def webhook(stack: Stack, process: WorkerProcess, body: bytes) -> tuple[int, dict[str, Any]]:
    secret = stack.settings.stripe_webhook_secret.get_secret_value()
    return deliver(process, body, sign(secret, body, int(time.time())))


async def _fetch(settings: Settings, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def snapshot(stack: Stack, escrow_id: str) -> dict[str, Any]:
    rows = asyncio.run(
        _fetch(stack.settings, "SELECT snapshot::text AS s FROM escrows WHERE id = $1", escrow_id)
    )
    return json.loads(rows[0]["s"]) if rows else {}


def poll(check: Callable[[], T | None], timeout_s: float = 30) -> T | None:
    """``check()`` until it answers (bounded, every 0.25 s); its last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check()
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.25)


def snapshot_when(stack: Stack, escrow_id: str, ready: Any, timeout_s: float = 30) -> Any:
    """The mirrored snapshot once ``ready(snapshot)`` holds (bounded), else the last one."""

    def check() -> dict[str, Any] | None:
        found = snapshot(stack, escrow_id)
        return found if found and ready(found) else None

    return poll(check, timeout_s) or snapshot(stack, escrow_id)


def chargeback_is(status: str) -> Any:
    return lambda s: (s.get("chargeback") or {}).get("status") == status


def events_of(stack: Stack, escrow_id: str) -> list[dict[str, Any]]:
    rows = asyncio.run(
        _fetch(
            stack.settings,
            "SELECT event_type, data::text AS data FROM escrow_events"
            " WHERE escrow_id = $1 ORDER BY version",
            escrow_id,
        )
    )
    return [{"type": r["event_type"], "data": json.loads(r["data"])} for r in rows]


def effect_row(stack: Stack, key: str) -> asyncpg.Record | None:
    rows = asyncio.run(
        _fetch(stack.settings, "SELECT * FROM payment_effects WHERE effect_key = $1", key)
    )
    return rows[0] if rows else None


def intent_of(stack: Stack, escrow_id: str) -> str:
    """The PaymentIntent that funded the escrow, once the mirror has it (it trails the table
    the HTTP reads come from)."""
    funded = snapshot_when(stack, escrow_id, lambda s: (s.get("payment") or {}).get("fundedAt"))
    return str(funded["payment"]["fundedProviderPaymentId"])


def stuck_reasons(stack: Stack, escrow_id: str, later: timedelta | None = None) -> list[str]:
    async def query() -> list[str]:
        pool = await asyncpg.create_pool(stack.settings.database_url.get_secret_value())
        try:
            now = datetime.now(UTC) + (later or timedelta())
            rows = await stuck_escrows(pool, now, [escrow_id])
        finally:
            await pool.close()
        return [r["waiting_for"] for r in rows]

    return asyncio.run(query())


def assert_ledger_balanced(found: dict[str, Any]) -> Escrow:
    escrow = Escrow.model_validate(found)
    assert check_invariants(escrow) == []
    return escrow


def open_chargeback(
    stack: Stack, process: WorkerProcess, escrow_id: str, dispute_id: str
) -> dict[str, Any]:
    intent = intent_of(stack, escrow_id)
    body = dispute_body("charge.dispute.created", intent, dispute_id, "x")
    status, answer = webhook(stack, process, body)
    assert status == 200 and answer.get("commandId"), (intent, answer, snapshot(stack, escrow_id))
    opened = snapshot_when(stack, escrow_id, chargeback_is("OPEN"))
    assert chargeback_is("OPEN")(opened), process.log_tail()
    return opened


def close_chargeback(
    stack: Stack, process: WorkerProcess, escrow_id: str, dispute_id: str, status: str
) -> None:
    body = dispute_body("charge.dispute.closed", intent_of(stack, escrow_id), dispute_id, status)
    code, answer = webhook(stack, process, body)
    assert code == 200 and answer.get("commandId"), answer


# -- tests --------------------------------------------------------------------------------


def test_open_chargeback_refuses_release_until_won_and_is_applied_once(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id = funded_escrow(stack, process, buyer, seller)
    dispute_id = f"dp_{uuid.uuid4().hex[:12]}"

    # the same dispute webhook three times: one command, one event
    body = dispute_body("charge.dispute.created", intent_of(stack, escrow_id), dispute_id, "x")
    answers = [webhook(stack, process, body) for _ in range(3)]
    assert {s for s, _ in answers} == {200}
    assert len({json.dumps(a, sort_keys=True) for _, a in answers}) == 1
    opened = snapshot_when(stack, escrow_id, chargeback_is("OPEN"))
    assert opened["status"] == "FUNDS_HELD", process.log_tail()
    assert opened["chargeback"]["disputeId"] == dispute_id
    assert opened["chargeback"]["amount"] == str(AMOUNT)
    outbox = asyncio.run(
        _fetch(
            stack.settings,
            "SELECT count(*) AS n FROM outbox WHERE aggregate_id = $1 "
            "AND convert_from(payload, 'UTF8') LIKE '%OpenChargeback%'",
            escrow_id,
        )
    )
    assert outbox[0]["n"] == 1
    # a fourth delivery as a new Stripe event (same dispute): accepted, changes nothing
    assert webhook(stack, process, body.replace(b'"evt_', b'"evt_re'))[0] == 200

    # refused over HTTP...
    status, _, problem = act(stack, process, buyer, escrow_id, "release")
    assert (status, problem["code"]) == (409, "CHARGEBACK_OPEN"), problem
    # ...and on the stream
    command = wire_command("ReleaseFunds", escrow_id, {"id": buyer, "role": "user"})
    asyncio.run(stack.send([command]))
    refused = asyncio.run(
        stack.rejections(lambda rs: any(r["commandId"] == command["commandId"] for r in rs))
    )
    assert [r["code"] for r in refused if r["commandId"] == command["commandId"]] == [
        "CHARGEBACK_OPEN"
    ]
    assert stuck_reasons(stack, escrow_id) == ["chargeback_open"]
    time.sleep(1)
    types = [e["type"] for e in events_of(stack, escrow_id)]
    assert types.count("ChargebackOpened") == 1
    assert "SettlementRequested" not in types

    # won: the escrow continues, and a release pays the seller
    close_chargeback(stack, process, escrow_id, dispute_id, "won")
    won = snapshot_when(stack, escrow_id, chargeback_is("WON"))
    assert won["status"] == "FUNDS_HELD" and won["chargeback"]["closedAt"], process.log_tail()
    assert act(stack, process, seller, escrow_id, "deliver", {})[0] == 200
    status, _, released = act(stack, process, buyer, escrow_id, "release")
    assert status == 200, released
    done = snapshot_when(stack, escrow_id, lambda s: s["status"] == "RELEASED", SETTLED_WAIT_S)
    assert done["status"] == "RELEASED", process.log_tail()
    assert len(proxy.requests("/v1/transfers", escrow_id)) >= 1
    assert proxy.requests("/v1/refunds", escrow_id) == []
    assert_ledger_balanced(done)
    assert stuck_reasons(stack, escrow_id) == []


def test_lost_on_held_funds_ends_refunded_with_no_stripe_refund(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id = funded_escrow(stack, process, buyer, seller)
    dispute_id = f"dp_{uuid.uuid4().hex[:12]}"
    open_chargeback(stack, process, escrow_id, dispute_id)

    close_chargeback(stack, process, escrow_id, dispute_id, "lost")
    lost = snapshot_when(stack, escrow_id, lambda s: s["status"] == "REFUNDED")
    assert lost["status"] == "REFUNDED", process.log_tail()
    assert lost["chargeback"]["status"] == "LOST"
    assert lost["refundedAmount"] == str(AMOUNT) and lost["settlement"] is None
    (refunded,) = [e for e in events_of(stack, escrow_id) if e["type"] == "EscrowRefunded"]
    assert refunded["data"]["reason"] == "CHARGEBACK"
    assert refunded["data"]["providerReference"] == dispute_id
    escrow = assert_ledger_balanced(lost)
    assert ledger_balances(escrow)[f"buyer:{buyer}"] == AMOUNT
    assert [p.kind.value for p in escrow.ledger][-1] == "CHARGEBACK_REFUND"
    time.sleep(2)  # the payments agent has seen the event: still nothing sent
    assert proxy.requests("/v1/refunds", escrow_id) == []
    assert proxy.requests("/v1/transfers", escrow_id) == []


def test_chargeback_after_release_is_ledger_only(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id = funded_escrow(stack, process, buyer, seller)
    assert act(stack, process, seller, escrow_id, "deliver", {})[0] == 200
    assert act(stack, process, buyer, escrow_id, "release")[0] == 200
    released = snapshot_when(stack, escrow_id, lambda s: s["status"] == "RELEASED", SETTLED_WAIT_S)
    assert released["status"] == "RELEASED", process.log_tail()
    transfers = len(proxy.requests("/v1/transfers", escrow_id))
    assert transfers >= 1

    dispute_id = f"dp_{uuid.uuid4().hex[:12]}"
    opened = open_chargeback(stack, process, escrow_id, dispute_id)
    assert opened["status"] == "RELEASED"
    escrow = assert_ledger_balanced(opened)
    balances = ledger_balances(escrow)
    assert balances[f"seller:{seller}:receivable"] == AMOUNT
    assert balances["platform:chargebacks"] == -AMOUNT
    assert events_of(stack, escrow_id)[-1]["type"] == "ChargebackOpened"
    assert stuck_reasons(stack, escrow_id) == ["chargeback_open"]

    close_chargeback(stack, process, escrow_id, dispute_id, "lost")
    lost = snapshot_when(stack, escrow_id, chargeback_is("LOST"))
    assert lost["status"] == "RELEASED", process.log_tail()
    assert ledger_balances(assert_ledger_balanced(lost))[f"seller:{seller}:receivable"] == AMOUNT
    assert stuck_reasons(stack, escrow_id) == ["chargeback_lost"]
    time.sleep(2)
    assert len(proxy.requests("/v1/transfers", escrow_id)) == transfers
    assert proxy.requests("/v1/refunds", escrow_id) == []


def test_a_settlement_not_yet_sent_is_held_while_open_and_sent_once_won(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id = funded_escrow(stack, process, buyer, seller)
    assert act(stack, process, seller, escrow_id, "deliver", {})[0] == 200
    proxy.fail("/v1/transfers", 10_000, key_contains=escrow_id)  # Stripe down for it
    status, _, pending = act(stack, process, buyer, escrow_id, "release")
    assert status == 200, pending
    key = pending["settlement"]["settlementId"]
    assert poll(lambda: proxy.requests("/v1/transfers", escrow_id))

    dispute_id = f"dp_{uuid.uuid4().hex[:12]}"
    opened = open_chargeback(stack, process, escrow_id, dispute_id)
    assert opened["settlement"]["settlementId"] == key  # accepted while it was pending

    def held() -> bool:
        row = effect_row(stack, key)
        return row is not None and row["held"] and row["state"] == "STARTED"

    assert poll(held, timeout_s=10), process.log_tail()
    proxy.clear_faults()  # Stripe is back, but the transfer is held
    tried = len(proxy.requests("/v1/transfers", escrow_id))
    time.sleep(3)
    assert len(proxy.requests("/v1/transfers", escrow_id)) == tried
    assert snapshot(stack, escrow_id)["status"] == "DELIVERED"

    close_chargeback(stack, process, escrow_id, dispute_id, "won")
    done = snapshot_when(stack, escrow_id, lambda s: s["status"] == "RELEASED", SETTLED_WAIT_S)
    assert done["status"] == "RELEASED", process.log_tail()
    row = effect_row(stack, key)
    assert row is not None and (row["state"], row["held"]) == ("SUCCEEDED", False)
    keys = {e.key for e in proxy.requests("/v1/transfers", escrow_id)}
    assert keys == {key}  # the same idempotency key throughout
    assert_ledger_balanced(done)


def test_a_held_refund_is_never_sent_when_the_chargeback_is_lost(
    worker: tuple[Stack, WorkerProcess], proxy: StripeProxy
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id = funded_escrow(stack, process, buyer, seller)
    proxy.fail("/v1/refunds", 10_000, key_contains=escrow_id)
    admin = token(stack, "ops", Role.ADMIN)
    path = f"/api/escrow/{escrow_id}/refund"
    status, _, pending = call(process, "POST", path, admin, {"reason": "cannot deliver"}, WAIT)
    assert status == 200, pending
    key = pending["settlement"]["settlementId"]
    assert poll(lambda: proxy.requests("/v1/refunds", escrow_id))

    dispute_id = f"dp_{uuid.uuid4().hex[:12]}"
    open_chargeback(stack, process, escrow_id, dispute_id)
    assert poll(lambda: (effect_row(stack, key) or {"held": False})["held"], 10), process.log_tail()
    proxy.clear_faults()
    tried = len(proxy.requests("/v1/refunds", escrow_id))

    close_chargeback(stack, process, escrow_id, dispute_id, "lost")
    lost = snapshot_when(stack, escrow_id, lambda s: s["status"] == "REFUNDED")
    assert lost["status"] == "REFUNDED" and lost["settlement"] is None, process.log_tail()

    def dropped() -> bool:
        row = effect_row(stack, key)
        return row is not None and (row["state"], row["error_code"]) == (
            "FAILED",
            "chargeback_lost",
        )

    assert poll(dropped, timeout_s=10), process.log_tail()
    time.sleep(2)
    assert len(proxy.requests("/v1/refunds", escrow_id)) == tried  # none after the hold
    assert all(e.status >= 500 for e in proxy.requests("/v1/refunds", escrow_id))
    assert_ledger_balanced(lost)


def test_a_dispute_on_an_unknown_payment_intent_is_acknowledged_and_ignored(
    worker: tuple[Stack, WorkerProcess],
) -> None:
    stack, process = worker
    body = dispute_body("charge.dispute.created", "pi_not_ours", "dp_not_ours", "x")
    status, answer = webhook(stack, process, body)
    assert (status, answer.get("ignored")) == (200, "charge.dispute.created")
    assert "commandId" not in answer


def test_card_funds_held_too_long_are_listed_as_stuck(
    worker: tuple[Stack, WorkerProcess],
) -> None:
    stack, process = worker
    buyer, seller = parties(stack, process)
    escrow_id = funded_escrow(stack, process, buyer, seller)
    mirrored = snapshot_when(stack, escrow_id, lambda s: s["status"] == "FUNDS_HELD")
    assert mirrored["status"] == "FUNDS_HELD"
    assert stuck_reasons(stack, escrow_id) == []
    assert stuck_reasons(stack, escrow_id, timedelta(days=79)) == []
    assert stuck_reasons(stack, escrow_id, timedelta(days=81)) == ["hold_warning"]
    assert stuck_reasons(stack, escrow_id, timedelta(days=91)) == ["hold_max"]
