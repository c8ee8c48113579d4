"""The command processor on the real broker: driven only by Kafka messages, checked on the
events, rejections and DLQ topics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from escrow_stream.config import Settings
from escrow_stream.db.kyc import KycDirectory
from escrow_stream.db.pool import Database
from tests.builders import wire_command
from tests.harness import Stack, WorkerProcess, activate_payouts, eventually

pytestmark = pytest.mark.integration

BUYER = {"id": "buyer-1", "role": "user"}
SELLER = {"id": "seller-1", "role": "user"}
OTHER = {"id": "stranger-1", "role": "user"}
ADMIN = {"id": "admin-1", "role": "admin"}
SYSTEM = {"id": "payments-agent", "role": "system"}
AMOUNT, FEE = 10_000, 500


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings) -> Iterator[Stack]:
    stack = Stack.create(tmp_path_factory.mktemp("processing"))
    asyncio.run(activate_payouts(stack.settings, SELLER["id"]))  # releases pay it
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[WorkerProcess]:
    asyncio.run(stack.create_topics())
    worker = stack.worker().start()
    worker.wait_healthy()
    yield worker
    assert worker.stop() == 0, worker.log_tail()


def create(escrow_id: str, rail: str = "STRIPE", **extra: Any) -> dict[str, Any]:
    currency = "USD" if rail == "STRIPE" else "USDC"
    payload = {
        "offerId": f"offer-{escrow_id}",
        "contractId": f"contract-{escrow_id}",
        "buyerId": BUYER["id"],
        "sellerId": SELLER["id"],
        "rail": rail,
        "amount": str(AMOUNT),
        "currency": currency,
        "sellerFee": str(FEE),
        "sellerAccountId": "acct_seller",
        **extra,
    }
    return wire_command("CreateEscrow", escrow_id, BUYER, payload)


def funds(escrow_id: str, rail: str = "STRIPE", amount: int = AMOUNT) -> dict[str, Any]:
    provider = "stripe" if rail == "STRIPE" else "custodian"
    payload = {
        "provider": provider,
        "providerPaymentId": f"pay-{escrow_id}",
        "amount": str(amount),
        "currency": "USD" if rail == "STRIPE" else "USDC",
    }
    return wire_command("ConfirmFunds", escrow_id, SYSTEM, payload)


def settled(
    escrow_id: str, amount: int, provider: str = "stripe", kind: str = "release", attempt: int = 1
) -> dict[str, Any]:
    payload = {
        "settlementId": f"escrow-{kind}:{escrow_id}:all:{attempt}",
        "provider": provider,
        "providerReference": f"tr-{escrow_id}",
        "amount": str(amount),
    }
    return wire_command("ConfirmSettlement", escrow_id, SYSTEM, payload)


def of(escrow_id: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in items if i["escrowId"] == escrow_id]


def new_id() -> str:
    return f"esc-{uuid.uuid4().hex[:12]}"


async def test_stripe_happy_path_to_released(stack: Stack, worker: WorkerProcess) -> None:
    e = new_id()
    instructions = wire_command(
        "RecordPaymentInstructions",
        e,
        SYSTEM,
        {"provider": "stripe", "providerPaymentId": "pi_123"},
    )
    commands = [
        create(e),
        instructions,
        funds(e),
        wire_command("MarkDelivered", e, SELLER, {"note": "done"}),
        wire_command("ReleaseFunds", e, BUYER),
        settled(e, AMOUNT - FEE),
    ]
    await stack.send(commands)
    events = of(e, await stack.events(lambda es: len(of(e, es)) >= 6))
    assert [ev["type"] for ev in events] == [
        "EscrowCreated",
        "PaymentInstructionsRecorded",
        "EscrowFundsHeld",
        "EscrowDelivered",
        "SettlementRequested",
        "EscrowReleased",
    ]
    assert [ev["version"] for ev in events] == [1, 2, 3, 4, 5, 6]
    assert [ev["causationId"] for ev in events] == [c["commandId"] for c in commands]
    assert len({ev["eventId"] for ev in events}) == 6
    final = events[-1]["escrow"]
    assert final["status"] == "RELEASED"
    assert final["releasedAmount"] == str(AMOUNT)
    assert final["ledger"][-1]["lines"][1] == {
        "account": "seller:seller-1",
        "amount": str(AMOUNT - FEE),
    }
    assert events[1]["escrow"]["payment"]["providerPaymentId"] == "pi_123"
    assert "clientSecret" not in json.dumps(events)  # the buyer alone reads it (SPEC §10)

    # the PostgreSQL mirror: current state, full history, audit trail, balanced ledger
    mirrored = await eventually(lambda: _mirror_rows(stack, e), timeout_s=60)
    assert mirrored["status"] == "RELEASED"
    assert mirrored["snapshot"] == final
    assert mirrored["versions"] == [1, 2, 3, 4, 5, 6]
    assert mirrored["audit"] == [
        (None, "AWAIT_FUNDS"),
        ("AWAIT_FUNDS", "AWAIT_FUNDS"),
        ("AWAIT_FUNDS", "FUNDS_HELD"),
        ("FUNDS_HELD", "DELIVERED"),
        ("DELIVERED", "DELIVERED"),
        ("DELIVERED", "RELEASED"),
    ]
    assert mirrored["ledger"] == {
        "external:stripe": -AMOUNT,
        f"escrow:{e}:holding": 0,
        "seller:seller-1": AMOUNT - FEE,
        "platform:fees": FEE,
    }


async def _mirror_rows(stack: Stack, escrow_id: str) -> dict[str, Any] | None:
    conn = await asyncpg.connect(stack.settings.database_url.get_secret_value())
    try:
        row = await conn.fetchrow(
            "SELECT status, snapshot::text AS snapshot FROM escrows WHERE id = $1", escrow_id
        )
        if row is None or row["status"] != "RELEASED":
            return None
        versions = await conn.fetch(
            "SELECT version FROM escrow_events WHERE escrow_id = $1 ORDER BY version", escrow_id
        )
        audit = await conn.fetch(
            "SELECT a.from_status, a.to_status FROM audit_logs a"
            " JOIN escrow_events e USING (event_id) WHERE a.escrow_id = $1 ORDER BY e.version",
            escrow_id,
        )
        ledger = await conn.fetch(
            "SELECT account, sum(amount)::bigint AS total FROM ledger_entries"
            " WHERE escrow_id = $1 GROUP BY account",
            escrow_id,
        )
    finally:
        await conn.close()
    return {
        "status": row["status"],
        "snapshot": json.loads(row["snapshot"]),
        "versions": [r["version"] for r in versions],
        "audit": [(r["from_status"], r["to_status"]) for r in audit],
        "ledger": {r["account"]: r["total"] for r in ledger},
    }


async def test_usdc_path_refunded_by_seller(stack: Stack, worker: WorkerProcess) -> None:
    e = new_id()
    commands = [
        create(e, rail="USDC_BASE"),
        funds(e, rail="USDC_BASE"),
        wire_command("RefundEscrow", e, SELLER, {"reason": "out of stock"}),
        settled(e, AMOUNT, provider="custodian", kind="refund"),
    ]
    await stack.send(commands)
    events = of(e, await stack.events(lambda es: len(of(e, es)) >= 4))
    assert [ev["type"] for ev in events] == [
        "EscrowCreated",
        "EscrowFundsHeld",
        "SettlementRequested",
        "EscrowRefunded",
    ]
    assert events[-1]["escrow"]["status"] == "REFUNDED"


async def test_dispute_resolved_by_admin(stack: Stack, worker: WorkerProcess) -> None:
    e = new_id()
    commands = [
        create(e),
        funds(e),
        wire_command("RaiseDispute", e, BUYER, {"reason": "not as described"}),
        wire_command("ResolveDispute", e, ADMIN, {"resolution": "REFUND", "reason": "agreed"}),
        settled(e, AMOUNT, kind="refund"),
    ]
    await stack.send(commands)
    events = of(e, await stack.events(lambda es: len(of(e, es)) >= 5))
    assert [ev["escrow"]["status"] for ev in events] == [
        "AWAIT_FUNDS",
        "FUNDS_HELD",
        "DISPUTED",
        "DISPUTED",
        "REFUNDED",
    ]


REJECTION_CASES: list[tuple[str, list[str], str]] = [
    # (name, setup steps, the code the last command gets)
    ("not found", ["deliver"], "NOT_FOUND"),
    ("already exists", ["create", "create-again"], "ALREADY_EXISTS"),
    ("wrong actor", ["create", "funds", "deliver-by-buyer"], "NOT_AUTHORIZED"),
    ("stranger cancels", ["create", "cancel-by-stranger"], "NOT_AUTHORIZED"),
    ("unsigned system command", ["create", "funds-unsigned"], "NOT_AUTHORIZED"),
    ("invalid transition", ["create", "release"], "INVALID_TRANSITION"),
    ("amount mismatch", ["create", "funds-short"], "AMOUNT_MISMATCH"),
    (
        "settlement pending",
        ["create", "funds", "deliver", "release", "dispute"],
        "SETTLEMENT_PENDING",
    ),
    ("deadline not reached", ["create", "timeout-cancel"], "DEADLINE_NOT_REACHED"),
    ("terminal absorbs", ["create", "cancel", "funds"], "INVALID_TRANSITION"),
    ("over the maximum amount", ["create-huge"], "VALIDATION_FAILED"),
    (
        "timeout action not configured",
        ["create", "funds", "deliver", "timeout-release"],
        "FEATURE_DISABLED",
    ),
]


def step(name: str, e: str) -> tuple[dict[str, Any], bool]:
    """A command for a named step, and whether system commands get signed."""
    steps: dict[str, dict[str, Any]] = {
        "create": create(e),
        "create-again": create(e),
        "funds": funds(e),
        "funds-unsigned": funds(e),
        "funds-short": funds(e, amount=AMOUNT - 1),
        "deliver": wire_command("MarkDelivered", e, SELLER),
        "deliver-by-buyer": wire_command("MarkDelivered", e, BUYER),
        "release": wire_command("ReleaseFunds", e, BUYER),
        "dispute": wire_command("RaiseDispute", e, BUYER, {"reason": "late"}),
        "cancel": wire_command("CancelEscrow", e, BUYER, {"reason": "BUYER_CANCELLED"}),
        "cancel-by-stranger": wire_command("CancelEscrow", e, OTHER, {"reason": "BUYER_CANCELLED"}),
        "timeout-cancel": wire_command("CancelEscrow", e, SYSTEM, {"reason": "TIMEOUT"}),
        "timeout-release": wire_command("ReleaseFunds", e, SYSTEM, {"reason": "TIMEOUT"}),
        "create-huge": {
            **create(e),
            "payload": {**create(e)["payload"], "amount": str(10**15)},
        },
    }
    return steps[name], name != "funds-unsigned"


async def test_every_rejection_path(stack: Stack, worker: WorkerProcess) -> None:
    expected: dict[str, tuple[str, str]] = {}  # last commandId -> (case, code)
    for case, steps, code in REJECTION_CASES:
        e = new_id()
        for name in steps:
            command, signed = step(name, e)
            await stack.send([command], sign_system=signed)
        expected[command["commandId"]] = (case, code)
    rejections = await stack.rejections(lambda rs: expected.keys() <= {r["commandId"] for r in rs})
    got = {r["commandId"]: r["code"] for r in rejections if r["commandId"] in expected}
    assert {expected[c][0]: code for c, code in got.items()} == {
        case: code for case, _, code in REJECTION_CASES
    }


async def test_duplicate_command_reemits_the_same_events(
    stack: Stack, worker: WorkerProcess
) -> None:
    e = new_id()
    first = create(e)
    await stack.send([first, funds(e)])
    await stack.events(lambda es: len(of(e, es)) >= 2)
    await stack.send([first])  # the same commandId again, after later commands
    events = of(e, await stack.events(lambda es: len(of(e, es)) >= 3))
    assert [ev["type"] for ev in events] == ["EscrowCreated", "EscrowFundsHeld", "EscrowCreated"]
    assert events[2]["eventId"] == events[0]["eventId"]
    assert events[2]["version"] == 1
    rejections = await stack.rejections(lambda rs: False, timeout_s=1)
    assert first["commandId"] not in {r["commandId"] for r in rejections}


async def test_poison_messages_go_to_the_dlq_and_processing_continues(
    stack: Stack, worker: WorkerProcess
) -> None:
    e = new_id()
    huge = wire_command("CreateEscrow", e, BUYER, {"note": "x" * 1_000_000})
    poison: list[tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]] = [
        (e.encode(), b"{not json", []),
        (e.encode(), json.dumps({"type": "CreateEscrow", "escrowId": e}).encode(), []),
        (e.encode(), json.dumps(wire_command("TransferEverything", e, BUYER)).encode(), []),
        (e.encode(), json.dumps(huge).encode(), []),
        (b"some-other-key", json.dumps(create(e)).encode(), []),
        (e.encode(), json.dumps([1, 2, 3]).encode(), []),
        (e.encode(), b"[" * 200_000 + b"]" * 200_000, []),  # RecursionError in json.loads
        (e.encode(), b'{"escrowId": "\xff\xfe"}', []),  # not UTF-8
        # a NUL in free text: refused at validation, so the mirror can never meet it
        (
            e.encode(),
            json.dumps(wire_command("MarkDelivered", e, SELLER, {"note": "a\x00b"})).encode(),
            [],
        ),
    ]
    good = create(e)
    await stack.send_raw(poison)
    await stack.send([good])
    events = of(e, await stack.events(lambda es: len(of(e, es)) >= 1))
    assert events[0]["causationId"] == good["commandId"]

    dlq = await stack.read(stack.settings.kafka_dlq_topic, lambda rs: len(rs) >= len(poison))
    # The DLQ keeps each message's key, so records spread over partitions: compare as sets.
    by_value = {r.value[:64]: dict(r.headers) for r in dlq}
    reasons = sorted(h["x-dlq-reason"].decode() for h in by_value.values())
    assert reasons == sorted(
        [
            "invalid_json",
            "invalid_schema",
            "unknown_type",
            "invalid_schema",
            "key_mismatch",
            "invalid_schema",
            "invalid_json",
            "invalid_json",
            "invalid_schema",
        ]
    )
    [nul] = [dict(r.headers) for r in dlq if b"a\\u0000b" in r.value]
    assert b"U+0000" in nul["x-dlq-error"]
    assert by_value[b"{not json"]["x-dlq-reason"] == b"invalid_json"
    truncated = [h for h in by_value.values() if "x-dlq-truncated-from-bytes" in h]
    assert len(truncated) == 1
    assert int(truncated[0]["x-dlq-truncated-from-bytes"]) > 1_000_000
    assert all(
        h["x-dlq-source-topic"].decode() == stack.settings.kafka_commands_topic
        for h in by_value.values()
    )
    assert all(h["x-dlq-error"] for h in by_value.values())


async def test_redelivered_rejection_keeps_its_outcome(stack: Stack, worker: WorkerProcess) -> None:
    """A rejected command seen again after the state changed gets the same rejection."""
    e = new_id()
    early_release = wire_command("ReleaseFunds", e, BUYER)
    await stack.send([create(e), funds(e), early_release, wire_command("MarkDelivered", e, SELLER)])
    await stack.events(lambda es: len(of(e, es)) >= 3)
    await stack.send([early_release])  # now DELIVERED: deciding again would accept it
    rejections = of(
        e,
        await stack.rejections(
            lambda rs: [r["commandId"] for r in rs].count(early_release["commandId"]) >= 2
        ),
    )
    assert [r["code"] for r in rejections] == ["INVALID_TRANSITION", "INVALID_TRANSITION"]
    events = of(e, await stack.events(lambda es: False, timeout_s=2))
    assert "SettlementRequested" not in [ev["type"] for ev in events]


def faust_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [sys.executable, "-m", "faust", "-A", "escrow_stream.app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_faust_cli_reads_escrows_from_the_changelog(
    stack: Stack, worker: WorkerProcess
) -> None:
    e = new_id()
    await stack.send([create(e), funds(e)])
    await stack.events(lambda es: len(of(e, es)) >= 2)

    async def funds_held_in_changelog() -> dict[str, Any] | None:
        got = await asyncio.to_thread(faust_cli, stack, "escrow-get", e)
        if got.returncode != 0:
            return None
        found: dict[str, Any] = json.loads(got.stdout)
        return found if found["version"] == 2 else None

    escrow = await eventually(funds_held_in_changelog, timeout_s=60)
    assert escrow is not None
    assert (escrow["escrowId"], escrow["status"], escrow["version"]) == (e, "FUNDS_HELD", 2)

    listed = await asyncio.to_thread(faust_cli, stack, "escrow-list", "--status", "FUNDS_HELD")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert e in {r["escrowId"] for r in rows}
    assert {r["status"] for r in rows} == {"FUNDS_HELD"}

    missing = await asyncio.to_thread(faust_cli, stack, "escrow-get", "no-such-escrow")
    assert missing.returncode != 0
    assert "not found" in missing.stderr

    tables = await asyncio.to_thread(faust_cli, stack, "tables")
    assert "escrows" in tables.stdout and "command-outcomes" in tables.stdout


def test_kyc_gating_on_the_stream(tmp_path_factory: pytest.TempPathFactory, stack: Stack) -> None:
    """With FEATURE_KYC_GATING=true a create needs both parties verified in kyc_status."""
    gated = Stack.create(tmp_path_factory.mktemp("kyc"), FEATURE_KYC_GATING="true")
    asyncio.run(gated.create_topics())
    worker = gated.worker("kyc").start()
    try:
        worker.wait_healthy()
        run = uuid.uuid4().hex[:8]
        buyer, seller = f"kyc-buyer-{run}", f"kyc-seller-{run}"

        def gated_create(e: str) -> dict[str, Any]:
            command = create(e)
            command["actor"] = {"id": buyer, "role": "user"}
            command["payload"] = {**command["payload"], "buyerId": buyer, "sellerId": seller}
            return command

        blocked, allowed = new_id(), new_id()
        asyncio.run(gated.send([gated_create(blocked)]))
        rejections = asyncio.run(gated.rejections(lambda rs: bool(of(blocked, rs))))
        assert [r["code"] for r in of(blocked, rejections)] == ["KYC_REQUIRED"]

        asyncio.run(_verify(gated, buyer, seller))
        asyncio.run(gated.send([gated_create(allowed)]))
        events = asyncio.run(gated.events(lambda es: bool(of(allowed, es))))
        assert [e["type"] for e in of(allowed, events)] == ["EscrowCreated"]
    finally:
        assert worker.stop() == 0, worker.log_tail()


async def _verify(stack: Stack, *user_ids: str) -> None:
    database = Database(stack.settings)
    try:
        for user_id in user_ids:
            await KycDirectory(database).set_status(user_id, "VERIFIED", updated_by="test")
    finally:
        await database.close()


async def test_a_command_id_reused_with_another_payload_is_refused(
    stack: Stack, worker: WorkerProcess
) -> None:
    e = new_id()
    first = create(e)
    await stack.send([first])
    await stack.events(lambda es: len(of(e, es)) >= 1)
    impostor = {**first, "payload": {**first["payload"], "amount": str(AMOUNT + 1)}}
    await stack.send([impostor, first])  # the reuse, then the genuine command again
    rejections = of(e, await stack.rejections(lambda rs: len(of(e, rs)) >= 1))
    assert [(r["commandId"], r["code"]) for r in rejections] == [
        (first["commandId"], "COMMAND_ID_REUSED")
    ]
    events = of(e, await stack.events(lambda es: len(of(e, es)) >= 2))
    assert [ev["eventId"] for ev in events] == [events[0]["eventId"]] * 2  # replayed, same id
    assert events[0]["escrow"]["amount"] == str(AMOUNT)
