"""The PostgreSQL mirror against the real test database.

Events are made by the domain (``decide``) and serialised exactly as the processor sends
them (``encode_event``); every test uses its own escrow ids, topic name and consumer name,
so tests never see each other's rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from escrow_stream.agents.mirror import apply_with_retry
from escrow_stream.config import Settings, load_settings
from escrow_stream.db import migrate
from escrow_stream.db.pool import Database, create_pool
from escrow_stream.db.projection import Mirror, MirrorRecord, MirrorResult
from escrow_stream.db.queries import reconcile, stuck_escrows
from escrow_stream.domain import (
    DecisionContext,
    DomainSettings,
    Escrow,
    Event,
    PayoutDestination,
    StripeAccountDestination,
    WalletDestination,
    decide,
    parse_command,
)
from escrow_stream.messages import encode_event
from tests.harness import free_port, stack_environ, unique

pytestmark = pytest.mark.integration

RULES = DomainSettings()
#: The seller's ACTIVE payout account per rail, as the processor would look it up.
PAYOUTS: dict[str, PayoutDestination] = {
    "STRIPE": StripeAccountDestination(account_id="acct_mirror_seller"),
    "USDC_BASE": WalletDestination(address="0x" + "5e" * 20),
}
BUYER = {"id": "buyer-1", "role": "user"}
SELLER = {"id": "seller-1", "role": "user"}
ADMIN = {"id": "admin-7", "role": "admin"}
SYSTEM = {"id": "payments-agent", "role": "system"}
AMOUNT, FEE = 10_000, 500

ESCROW_TABLES = (
    "escrows",
    "escrow_events",
    "audit_logs",
    "ledger_entries",
    "deliveries",
    "disputes",
    "stripe_escrows",
    "stablecoin_escrows",
    "milestone_escrows",
)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def migrated(stack_settings: Settings) -> Iterator[None]:
    """The test database at the newest schema (a no-op when it already is)."""
    migrate.upgrade(stack_settings)
    yield


@pytest.fixture
async def pool(stack_settings: Settings, migrated: None) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(stack_settings)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def names() -> tuple[str, str]:
    """A topic and a consumer name of this test's own."""
    run = unique("mirror")
    return f"{run}.events", f"{run}-consumer"


@pytest.fixture
def mirror(pool: asyncpg.Pool, names: tuple[str, str]) -> Mirror:
    return Mirror(pool, consumer=names[1])


# --- building events --------------------------------------------------------------------------


class Run:
    """One escrow driven through domain commands; keeps every event it produced."""

    def __init__(self, now: datetime | None = None) -> None:
        self.escrow_id = unique("esc")
        self.now = now or datetime.now(UTC).replace(microsecond=0)
        self.state: Escrow | None = None
        self.events: list[Event] = []
        self.payouts = PAYOUTS

    def send(self, type_: str, actor: dict[str, str], payload: dict[str, Any] | None = None) -> Run:
        command = parse_command(
            {
                "schemaVersion": 1,
                "commandId": f"{self.escrow_id}-c{len(self.events) + 1}",
                "type": type_,
                "escrowId": self.escrow_id,
                "actor": actor,
                "payload": payload or {},
                "issuedAt": self.now.isoformat(),
                "traceId": f"trace-{self.escrow_id}",
                "correlationId": f"corr-{self.escrow_id}",
            }
        )
        payout = self.payouts.get(self.state.rail) if self.state else None
        context = DecisionContext(seller_payout=payout)
        decision = decide(self.state, command, self.now, RULES, context)
        assert decision.rejection is None, decision.rejection
        assert decision.events and not decision.duplicate
        self.events.extend(decision.events)
        self.state = decision.events[-1].escrow
        self.now += timedelta(minutes=1)
        return self

    def payout(self) -> str:
        assert self.state is not None and self.state.settlement is not None
        return str(self.state.settlement.payout_amount)

    @property
    def last(self) -> Event:
        return self.events[-1]


def created(rail: str = "STRIPE", now: datetime | None = None, **extra: Any) -> Run:
    run = Run(now)
    return run.send(
        "CreateEscrow",
        BUYER,
        {
            "offerId": f"offer-{run.escrow_id}",
            "contractId": f"contract-{run.escrow_id}",
            "buyerId": BUYER["id"],
            "sellerId": SELLER["id"],
            "rail": rail,
            "amount": str(AMOUNT),
            "currency": "USD" if rail == "STRIPE" else "USDC",
            "sellerFee": str(FEE),
            "sellerAccountId": "acct_seller",
            **extra,
        },
    )


def funded(run: Run) -> Run:
    assert run.state is not None
    stripe = run.state.rail.value == "STRIPE"
    provider = "stripe" if stripe else "custodian"
    instructions: dict[str, Any] = {
        "provider": provider,
        "providerPaymentId": f"pay-{run.escrow_id}",
    }
    funds: dict[str, Any] = {
        "provider": provider,
        "providerPaymentId": f"pay-{run.escrow_id}",
        "amount": str(AMOUNT),
        "currency": "USD" if stripe else "USDC",
    }
    if not stripe:
        instructions["depositAddress"] = f"0xdeposit{run.escrow_id}"
        funds["senderAddress"] = f"0xsender{run.escrow_id}"
    run.send("RecordPaymentInstructions", SYSTEM, instructions)
    return run.send("ConfirmFunds", SYSTEM, funds)


def settle(run: Run, reference: str) -> Run:
    assert run.state is not None
    provider = "stripe" if run.state.rail.value == "STRIPE" else "custodian"
    assert run.state.settlement is not None
    payload = {
        "settlementId": run.state.settlement.settlement_id,
        "provider": provider,
        "providerReference": reference,
        "amount": run.payout(),
    }
    return run.send("ConfirmSettlement", SYSTEM, payload)


def stripe_released() -> Run:
    """STRIPE: funded, delivered, a failed release, released on the second attempt."""
    run = funded(created("STRIPE"))
    run.send("MarkDelivered", SELLER, {"note": "shipped", "evidenceKeys": ["ev/1.png"]})
    run.send("ReleaseFunds", BUYER)
    assert run.state is not None and run.state.settlement is not None
    run.send(
        "RecordSettlementFailure",
        SYSTEM,
        {
            "settlementId": run.state.settlement.settlement_id,
            "errorCode": "balance_insufficient",
            "errorMessage": "try later",
            "retryable": True,
        },
    )
    run.send("ReleaseFunds", BUYER)
    return settle(run, f"tr-{run.escrow_id}")


def usdc_disputed_refunded() -> Run:
    """USDC_BASE: funded, delivered, disputed by the buyer, resolved REFUND by an admin."""
    run = funded(created("USDC_BASE"))
    run.send("MarkDelivered", SELLER, {})
    run.send("RaiseDispute", BUYER, {"reason": "not as described", "evidenceKeys": ["ev/x"]})
    run.send("ResolveDispute", ADMIN, {"resolution": "REFUND", "reason": "seller at fault"})
    return settle(run, f"rf-{run.escrow_id}")


def milestones_released() -> Run:
    run = funded(
        created(
            "STRIPE",
            milestones=[
                {"milestoneId": "m1", "title": "Design", "amount": "6000"},
                {"milestoneId": "m2", "title": "Build", "amount": "4000"},
            ],
        )
    )
    for milestone in ("m1", "m2"):
        run.send("DeliverMilestone", SELLER, {"milestoneId": milestone})
        run.send("ReleaseMilestone", BUYER, {"milestoneId": milestone})
        settle(run, f"tr-{run.escrow_id}-{milestone}")
    return run


def records(
    events: list[Event], topic: str, partition: int = 0, start: int = 0
) -> list[MirrorRecord]:
    return [
        MirrorRecord(topic, partition, start + n, encode_event(event))
        for n, event in enumerate(events)
    ]


def wire(event: Event) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(encode_event(event))
    return decoded


# --- reading the mirror ------------------------------------------------------------------------


async def escrow_row(pool: asyncpg.Pool, escrow_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM escrows WHERE id = $1", escrow_id)
    assert row is not None
    return row


async def dump(pool: asyncpg.Pool, escrow_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every mirrored row of these escrows, without the mirror's own bookkeeping columns."""
    volatile = {"mirrored_at", "recorded_at", "kafka_partition", "kafka_offset", "id"}
    out: dict[str, list[dict[str, Any]]] = {}
    for table in ESCROW_TABLES:
        key = "id" if table == "escrows" else "escrow_id"
        rows = await pool.fetch(f"SELECT * FROM {table} WHERE {key} = ANY($1::text[])", escrow_ids)
        cleaned = [
            {
                k: v
                for k, v in dict(r).items()
                if k not in volatile or (table, k) == ("escrows", "id")
            }
            for r in rows
        ]
        out[table] = sorted(cleaned, key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return out


async def purge(pool: asyncpg.Pool, escrow_ids: list[str], consumer: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for table in reversed(ESCROW_TABLES):
            key = "id" if table == "escrows" else "escrow_id"
            await conn.execute(f"DELETE FROM {table} WHERE {key} = ANY($1::text[])", escrow_ids)
        await conn.execute("DELETE FROM consumer_offsets WHERE consumer = $1", consumer)


async def assert_mirrors(pool: asyncpg.Pool, run: Run) -> None:
    """The rows of ``run``'s escrow are exactly what its events say."""
    last = run.last
    row = await escrow_row(pool, run.escrow_id)
    assert row["snapshot"] == wire(last)["escrow"]
    assert row["version"] == last.escrow.version == len(run.events)
    assert row["status"] == last.escrow.status.value
    assert (row["funded_amount"], row["released_amount"], row["refunded_amount"]) == (
        last.escrow.funded_amount,
        last.escrow.released_amount,
        last.escrow.refunded_amount,
    )
    assert row["settlement"] == wire(last)["escrow"]["settlement"]
    assert row["expires_at"] == last.escrow.expires_at
    assert row["auto_refund_at"] == last.escrow.auto_refund_at

    stored = await pool.fetch(
        "SELECT * FROM escrow_events WHERE escrow_id = $1 ORDER BY version", run.escrow_id
    )
    assert [(str(r["event_id"]), r["version"], r["event_type"]) for r in stored] == [
        (e.event_id, e.version, e.type) for e in run.events
    ]
    assert [r["snapshot"] for r in stored] == [wire(e)["escrow"] for e in run.events]

    audit = await pool.fetch(
        "SELECT * FROM audit_logs WHERE escrow_id = $1 ORDER BY created_at, id", run.escrow_id
    )
    statuses = [None] + [e.escrow.status.value for e in run.events]
    assert [
        (str(a["event_id"]), a["action"], a["from_status"], a["to_status"], a["actor_id"])
        for a in audit
    ] == [
        (e.event_id, e.type, statuses[n], statuses[n + 1], e.actor.id)
        for n, e in enumerate(run.events)
    ]

    ledger = await pool.fetch(
        "SELECT * FROM ledger_entries WHERE escrow_id = $1 ORDER BY posted_at, event_id, line_no",
        run.escrow_id,
    )
    expected = [
        (p.posting_id, n, line.account, line.amount, p.currency.value)
        for p in last.escrow.ledger
        for n, line in enumerate(p.lines, start=1)
    ]
    assert sorted(
        (str(r["event_id"]), r["line_no"], r["account"], r["amount"], r["currency"]) for r in ledger
    ) == sorted(expected)
    sums: dict[str, int] = {}
    for r in ledger:
        sums[str(r["event_id"])] = sums.get(str(r["event_id"]), 0) + r["amount"]
    assert sums and set(sums.values()) == {0}
    assert await reconcile(pool, [run.escrow_id]) == []


# --- tests ----------------------------------------------------------------------------------


async def test_stripe_lifecycle_mirrors_every_event(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    run = stripe_released()
    result = await mirror.apply(records(run.events, names[0]))
    assert result == MirrorResult(applied=len(run.events))
    await assert_mirrors(pool, run)
    assert run.last.escrow.status.value == "RELEASED"

    stripe = await pool.fetchrow("SELECT * FROM stripe_escrows WHERE escrow_id = $1", run.escrow_id)
    assert stripe is not None
    assert stripe["payment_intent_id"] == f"pay-{run.escrow_id}"
    assert stripe["transfer_id"] == f"tr-{run.escrow_id}"
    assert stripe["refund_id"] is None
    deliveries = await pool.fetch("SELECT * FROM deliveries WHERE escrow_id = $1", run.escrow_id)
    assert [(d["note"], d["evidence_keys"], d["milestone_id"]) for d in deliveries] == [
        ("shipped", ["ev/1.png"], None)
    ]
    assert (
        await pool.fetchval("SELECT count(*) FROM disputes WHERE escrow_id = $1", run.escrow_id)
        == 0
    )
    offsets = await pool.fetch(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer = $1", names[1]
    )
    assert [tuple(r) for r in offsets] == [(names[0], 0, len(run.events))]


async def test_usdc_dispute_lifecycle_one_event_per_batch(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    run = usdc_disputed_refunded()
    for n, record in enumerate(records(run.events, names[0], partition=3)):
        result = await mirror.apply([record])
        assert result == MirrorResult(applied=1), n
    await assert_mirrors(pool, run)
    assert run.last.escrow.status.value == "REFUNDED"

    coin = await pool.fetchrow(
        "SELECT * FROM stablecoin_escrows WHERE escrow_id = $1", run.escrow_id
    )
    assert coin is not None
    assert coin["deposit_id"] == f"pay-{run.escrow_id}"
    assert coin["deposit_address"] == f"0xdeposit{run.escrow_id}"
    assert coin["sender_address"] == f"0xsender{run.escrow_id}"
    assert coin["transfer_id"] == f"rf-{run.escrow_id}"
    assert coin["frozen"] is False
    dispute = await pool.fetchrow("SELECT * FROM disputes WHERE escrow_id = $1", run.escrow_id)
    assert dispute is not None
    assert dict(dispute) | {"raised_at": None, "resolved_at": None} == {
        "escrow_id": run.escrow_id,
        "raised_by": BUYER["id"],
        "reason": "not as described",
        "evidence_keys": ["ev/x"],
        "raised_at": None,
        "resolution": "REFUND",
        "resolved_by": ADMIN["id"],
        "resolved_at": None,
    }
    assert run.last.escrow.dispute is not None
    assert dispute["raised_at"] == run.last.escrow.dispute.raised_at
    assert dispute["resolved_at"] == run.last.escrow.dispute.resolved_at
    audit = await pool.fetch(
        "SELECT from_status, to_status FROM audit_logs WHERE escrow_id = $1 ORDER BY id",
        run.escrow_id,
    )
    assert ("DELIVERED", "DISPUTED") in [tuple(a) for a in audit]
    assert ("DISPUTED", "REFUNDED") in [tuple(a) for a in audit]


async def test_milestone_lifecycle(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    run = milestones_released()
    # Batches of three: several events of one escrow per transaction, in order.
    all_records = records(run.events, names[0])
    for start in range(0, len(all_records), 3):
        await mirror.apply(all_records[start : start + 3])
    await assert_mirrors(pool, run)
    assert run.last.escrow.status.value == "RELEASED"
    milestones = await pool.fetch(
        "SELECT milestone_id, title, amount, status FROM milestone_escrows "
        "WHERE escrow_id = $1 ORDER BY milestone_id",
        run.escrow_id,
    )
    assert [tuple(m) for m in milestones] == [
        ("m1", "Design", 6000, "RELEASED"),
        ("m2", "Build", 4000, "RELEASED"),
    ]
    deliveries = await pool.fetch(
        "SELECT milestone_id FROM deliveries WHERE escrow_id = $1 ORDER BY delivered_at",
        run.escrow_id,
    )
    assert [d["milestone_id"] for d in deliveries] == ["m1", "m2"]
    stripe = await pool.fetchrow("SELECT * FROM stripe_escrows WHERE escrow_id = $1", run.escrow_id)
    assert stripe is not None and stripe["transfer_id"] == f"tr-{run.escrow_id}-m2"
    postings = await pool.fetchval(
        "SELECT count(DISTINCT event_id) FROM ledger_entries WHERE escrow_id = $1", run.escrow_id
    )
    assert postings == 3  # funding and one release per milestone


async def test_redelivered_offsets_are_skipped(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    run = stripe_released()
    batch = records(run.events, names[0])
    await mirror.apply(batch)
    before = await dump(pool, [run.escrow_id])

    assert await mirror.apply(batch) == MirrorResult(skipped_by_offset=len(batch))
    # A redelivery that overlaps the stored offset: the old part skipped, the rest applied.
    more = funded(created("STRIPE"))
    overlap = batch[-2:] + records(more.events, names[0], start=len(batch))
    result = await mirror.apply(overlap)
    assert result == MirrorResult(applied=len(more.events), skipped_by_offset=2)
    assert await dump(pool, [run.escrow_id]) == before
    await assert_mirrors(pool, more)


async def test_replay_at_new_offsets_is_a_no_op(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    run = usdc_disputed_refunded()
    await mirror.apply(records(run.events, names[0]))
    before = await dump(pool, [run.escrow_id])

    replay = records(run.events, names[0], start=1000)
    assert await mirror.apply(replay) == MirrorResult(duplicates=len(run.events))
    # The same events replayed to another partition (e.g. a repartitioned topic).
    other = records(run.events, names[0], partition=7)
    assert await mirror.apply(other) == MirrorResult(duplicates=len(run.events))
    assert await dump(pool, [run.escrow_id]) == before
    await assert_mirrors(pool, run)


async def test_older_version_never_overwrites_newer(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    run = stripe_released()
    events = run.events
    # v1, then v3 (v2 missing so far): the row is at v3, v3's from_status is unknown.
    await mirror.apply(records([events[0], events[2]], names[0]))
    assert (await escrow_row(pool, run.escrow_id))["version"] == 3
    # v2 arrives late: it is recorded, but the escrow stays at v3, and v3's audit row
    # now knows where it came from.
    result = await mirror.apply(records([events[1]], names[0], start=2))
    assert result == MirrorResult(applied=1)
    row = await escrow_row(pool, run.escrow_id)
    assert row["version"] == 3 and row["snapshot"] == wire(events[2])["escrow"]
    # The rest in order, then an old event again at a new offset: nothing moves back.
    await mirror.apply(records(events[3:], names[0], start=3))
    await mirror.apply(records(events[:4], names[0], start=100))
    await assert_mirrors(pool, run)


async def test_batch_with_duplicates_inside(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    run = milestones_released()
    e = run.events
    batch_events = [e[0], e[1], e[1], e[0], *e[2:], e[3], *e[-3:], e[-1]]
    result = await mirror.apply(records(batch_events, names[0]))
    assert result == MirrorResult(applied=len(e), duplicates=len(batch_events) - len(e))
    await assert_mirrors(pool, run)


async def test_invalid_records_are_skipped_and_counted(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    run = stripe_released()
    good = [encode_event(ev) for ev in run.events]
    nul = wire(run.events[1])
    nul["data"]["providerPaymentId"] = "bad\x00id"
    not_uuid = wire(run.events[1]) | {"eventId": "not-a-uuid"}
    other_escrow = wire(run.events[1]) | {"escrowId": "someone-else"}
    too_big = wire(run.events[0])
    too_big["escrow"]["amount"] = str(2**64)
    surrogate = wire(run.events[1])
    surrogate["data"]["providerPaymentId"] = "bad\ud800id"
    huge_version = wire(run.events[1]) | {"version": 2**31}
    bad = [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"type": "EscrowCreated", "escrowId": run.escrow_id}).encode(),
        json.dumps({**wire(run.events[0]), "type": "SomethingElse"}).encode(),
        json.dumps(nul).encode(),
        json.dumps(not_uuid).encode(),
        json.dumps(other_escrow).encode(),
        json.dumps(too_big).encode(),
        json.dumps(surrogate).encode(),
        json.dumps(huge_version).encode(),
        None,
    ]
    values = [*bad[:5], good[0], *bad[5:], *good[1:]]
    batch = [MirrorRecord(names[0], 0, n, v) for n, v in enumerate(values)]
    result = await mirror.apply(batch)
    assert result == MirrorResult(applied=len(good), invalid=len(bad))
    await assert_mirrors(pool, run)
    assert await pool.fetchval(
        "SELECT next_offset FROM consumer_offsets WHERE consumer = $1", names[1]
    ) == len(values)
    # Alone in a batch (so its offset is the highest), an invalid record still advances.
    result = await mirror.apply([MirrorRecord(names[0], 0, len(values), b"garbage")])
    assert result == MirrorResult(invalid=1)
    assert (
        await pool.fetchval(
            "SELECT next_offset FROM consumer_offsets WHERE consumer = $1", names[1]
        )
        == len(values) + 1
    )


async def test_event_postgresql_rejects_is_skipped_alone(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    """An event that passes validation but PostgreSQL refuses (NaN in an unknown data field
    cannot be jsonb) is skipped; the rest of its batch still commits."""
    run = stripe_released()
    poisoned = wire(run.events[2])
    poisoned["data"]["unknownExtra"] = float("nan")
    values = [encode_event(e) for e in run.events]
    values[2] = json.dumps(poisoned).encode()
    result = await mirror.apply([MirrorRecord(names[0], 0, n, v) for n, v in enumerate(values)])
    assert result == MirrorResult(applied=len(values) - 1, invalid=1)
    row = await escrow_row(pool, run.escrow_id)
    assert row["snapshot"] == wire(run.last)["escrow"]
    versions = await pool.fetch(
        "SELECT version FROM escrow_events WHERE escrow_id = $1 ORDER BY version", run.escrow_id
    )
    assert [v["version"] for v in versions] == [e.version for e in run.events if e.version != 3]
    assert await reconcile(pool, [run.escrow_id]) == []
    # The genuine event, re-produced later, fills the gap.
    assert await mirror.apply(records([run.events[2]], names[0], start=50)) == MirrorResult(
        applied=1
    )
    await assert_mirrors(pool, run)


async def test_any_redelivery_pattern_converges(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    """Random batching, crashes before the Kafka commit, re-produced duplicates: same rows."""
    runs = [stripe_released(), usdc_disputed_refunded(), milestones_released(), funded(created())]
    ids = [r.escrow_id for r in runs]
    topic, consumer = names

    # The reference: every event once, in order, one partition per escrow.
    for n, run in enumerate(runs):
        await mirror.apply(records(run.events, topic, partition=n % 2, start=100 * n))
    reference = await dump(pool, ids)
    await purge(pool, ids, consumer)

    for seed in range(6):
        rng = random.Random(seed)
        # Produce: per partition, the escrows' events interleaved in version order, with
        # some earlier events re-produced later (a replayed duplicate command).
        log: dict[int, list[Event]] = {0: [], 1: []}
        queues = [(n % 2, list(run.events)) for n, run in enumerate(runs)]
        sent: dict[int, list[Event]] = {0: [], 1: []}
        while any(q for _, q in queues):
            partition, queue = rng.choice([(p, q) for p, q in queues if q])
            if sent[partition] and rng.random() < 0.15:
                log[partition].append(rng.choice(sent[partition]))
            event = queue.pop(0)
            log[partition].append(event)
            sent[partition].append(event)
        topic_records = {p: records(events, topic, partition=p) for p, events in log.items()}
        # Consume: random batch sizes over both partitions; sometimes the Kafka commit is
        # lost after the database commit and the consumer goes back a few records.
        position = {0: 0, 1: 0}
        while any(position[p] < len(topic_records[p]) for p in (0, 1)):
            batch: list[MirrorRecord] = []
            for p in (0, 1):
                take = rng.randint(0, 7)
                batch += topic_records[p][position[p] : position[p] + take]
                position[p] = min(position[p] + take, len(topic_records[p]))
            if not batch:
                continue
            await mirror.apply(batch)
            if rng.random() < 0.3:
                p = rng.choice((0, 1))
                position[p] = max(0, position[p] - rng.randint(1, 10))
        assert await dump(pool, ids) == reference, f"seed {seed}"
        for run in runs:
            await assert_mirrors(pool, run)
        await purge(pool, ids, consumer)


async def test_reconcile_finds_corruption(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]
) -> None:
    runs = [stripe_released(), usdc_disputed_refunded()]
    ids = [r.escrow_id for r in runs]
    for n, run in enumerate(runs):
        await mirror.apply(records(run.events, names[0], partition=n))
    assert await reconcile(pool, ids) == []
    assert isinstance(await reconcile(pool), list)  # the whole database: runs, whatever it says

    one, two = runs
    # A line's amount changed: the posting no longer balances and differs from the snapshot.
    await pool.execute(
        "UPDATE ledger_entries SET amount = amount + 1 WHERE escrow_id = $1 AND line_no = 1 "
        "AND account LIKE 'external:%'",
        one.escrow_id,
    )
    problems = await reconcile(pool, ids)
    assert any("sums to 1, not 0" in p and one.escrow_id in p for p in problems), problems
    assert any("differs" in p for p in problems), problems
    assert all(two.escrow_id not in p for p in problems), problems

    # The totals of the row made impossible.
    await pool.execute(
        "UPDATE escrows SET released_amount = funded_amount + 1 WHERE id = $1", two.escrow_id
    )
    problems = await reconcile(pool, [two.escrow_id])
    assert any("exceeds funded" in p for p in problems), problems

    # A posting missing from the mirrored ledger; and a negative holding account.
    await pool.execute("UPDATE escrows SET released_amount = 0 WHERE id = $1", two.escrow_id)
    assert await reconcile(pool, [two.escrow_id]) == []
    await pool.execute(
        "DELETE FROM ledger_entries WHERE escrow_id = $1 AND posted_at = "
        "(SELECT min(posted_at) FROM ledger_entries WHERE escrow_id = $1)",
        two.escrow_id,
    )
    problems = await reconcile(pool, [two.escrow_id])
    assert any("1 postings mirrored, snapshot has 2" in p for p in problems), problems
    assert any("holding balance is negative" in p for p in problems), problems
    assert any("in the snapshot but not mirrored" in p for p in problems), problems


async def test_stuck_escrows(pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str]) -> None:
    long_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(days=60)
    expired = created("STRIPE", now=long_ago)
    overdue = funded(created("USDC_BASE", now=long_ago))
    overdue.send("MarkDelivered", SELLER, {})
    cancelled = created("STRIPE", now=long_ago).send(
        "CancelEscrow", BUYER, {"reason": "BUYER_CANCELLED"}
    )
    fresh = created("STRIPE")
    disputed = funded(created("STRIPE", now=long_ago)).send(
        "RaiseDispute", BUYER, {"reason": "late"}
    )
    waiting = funded(created("STRIPE")).send("MarkDelivered", SELLER, {})
    waiting.payouts = {}  # the seller has no payout account: the release waits
    waiting.send("ReleaseFunds", BUYER)
    runs = [expired, overdue, cancelled, fresh, disputed, waiting]
    batch = [ev for run in runs for ev in run.events]
    assert (await mirror.apply(records(batch, names[0]))).applied == len(batch)

    ids = [r.escrow_id for r in runs]
    stuck = await stuck_escrows(pool, datetime.now(UTC), ids)
    assert {s["id"]: (s["status"], s["waiting_for"]) for s in stuck} == {
        expired.escrow_id: ("AWAIT_FUNDS", "timeout"),
        overdue.escrow_id: ("DELIVERED", "timeout"),
        waiting.escrow_id: ("DELIVERED", "payout_account"),
    }
    assert set(stuck[0]) == {
        "id",
        "status",
        "version",
        "updated_at",
        "expires_at",
        "auto_refund_at",
        "waiting_for",
    }
    # Before the deadlines only the release waiting for a payout account is stuck.
    early = await stuck_escrows(pool, long_ago + timedelta(days=1), ids)
    assert [s["id"] for s in early] == [waiting.escrow_id]
    # Without a filter the query runs over every escrow and still finds these two.
    everything = {s["id"] for s in await stuck_escrows(pool, datetime.now(UTC))}
    assert {expired.escrow_id, overdue.escrow_id} <= everything
    assert fresh.escrow_id not in everything


async def test_empty_batch_touches_nothing(mirror: Mirror) -> None:
    assert await mirror.apply([]) == MirrorResult()


async def test_agent_retry_waits_for_the_database_and_gives_up_only_when_stopping(
    pool: asyncpg.Pool, mirror: Mirror, names: tuple[str, str], stack_settings: Settings
) -> None:
    run = funded(created())
    batch = records(run.events, names[0])
    # A database that refuses connections (nothing listens on the port): retried while the
    # worker is consuming, abandoned (None: nothing applied, nothing acked) once it stops.
    dsn = urlsplit(stack_settings.database_url.get_secret_value())
    nowhere = dsn._replace(netloc=f"{dsn.username}:{dsn.password}@127.0.0.1:{free_port()}")
    unreachable = load_settings(stack_environ(DATABASE_URL=urlunsplit(nowhere)))
    database = Database(unreachable)
    down = Mirror(database, consumer=names[1])
    checks: list[float] = []

    async def no_wait(seconds: float) -> None:
        checks.append(seconds)

    result = await apply_with_retry(down, batch, lambda: len(checks) < 8, no_wait)
    assert result is None
    assert sum(checks) >= 0.5 + 1.0 + 2.0  # backed off: 0.5 s, 1 s, 2 s, ... in 0.5 s steps
    await database.close()
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM escrow_events WHERE escrow_id = $1", run.escrow_id
        )
        == 0
    )
    # The database is there: the first attempt applies the batch.
    result = await apply_with_retry(mirror, batch, lambda: True, no_wait)
    assert result == MirrorResult(applied=len(run.events))
    await assert_mirrors(pool, run)
