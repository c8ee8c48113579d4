"""Accepting a command without servers: the idempotency protocol and the one unit of work
(``escrow_stream/intake.py``), on in-memory fakes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from escrow_stream.domain import Command
from escrow_stream.idempotency import BeginKind, MemoryIdempotencyStore
from escrow_stream.intake import (
    IdempotencyKey,
    Intake,
    Verdict,
    command_id_for,
    escrow_id_for,
)
from escrow_stream.messages import make_command
from escrow_stream.web.escrows import refusal
from escrow_stream.web.problems import Problem
from tests.unit.intake_support import MemoryUnits

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TOPIC = "escrow-commands"
ANSWER = {"escrowId": "e-1", "commandId": "c-1", "status": "ACCEPTED"}
KEY = IdempotencyKey("buyer-1", "key-1", "hash-1")


def cancel(command_id: str = "c-1") -> Command:
    actor = {"id": "buyer-1", "role": "user"}
    return make_command(
        actor, "CancelEscrow", "e-1", {"reason": "BUYER_CANCELLED"}, command_id, NOW
    )


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def units() -> MemoryUnits:
    return MemoryUnits()


@pytest.fixture
def store() -> MemoryIdempotencyStore:
    return MemoryIdempotencyStore(timedelta(hours=24))


@pytest.fixture
def wakes() -> Wakes:
    return Wakes()


@pytest.fixture
def intake(units: MemoryUnits, store: MemoryIdempotencyStore, wakes: Wakes) -> Intake:
    return Intake(units, store, lambda: NOW, TOPIC, "s" * 64, wakes, in_flight_wait_s=0.0)


async def test_first_accept_writes_the_outbox_row_and_the_record_in_one_unit(
    intake: Intake, units: MemoryUnits, store: MemoryIdempotencyStore, wakes: Wakes
) -> None:
    command = cancel()
    receipt = await intake.accept(command, ANSWER, key=KEY)
    assert (receipt.verdict, receipt.status, receipt.body) == (Verdict.ACCEPTED, 202, ANSWER)
    assert units.outbox == [(TOPIC, command)]
    assert units.commits == 1
    assert wakes.count == 1
    replay = await store.begin(KEY.scope, KEY.key, KEY.request_hash, NOW)
    assert (replay.kind, replay.status, replay.body) == (BeginKind.REPLAY, 202, ANSWER)


async def test_the_record_completes_only_when_the_unit_commits(
    units: MemoryUnits, store: MemoryIdempotencyStore
) -> None:
    await store.begin(KEY.scope, KEY.key, KEY.request_hash, NOW)
    with pytest.raises(RuntimeError):
        async with units.begin() as unit:
            await store.complete_in(unit, KEY.scope, KEY.key, 202, ANSWER)
            raise RuntimeError("rolled back")
    again = await store.begin(KEY.scope, KEY.key, KEY.request_hash, NOW)
    assert again.kind is BeginKind.CONFLICT_IN_FLIGHT


async def test_same_key_and_body_replays_and_enqueues_nothing(
    intake: Intake, units: MemoryUnits, wakes: Wakes
) -> None:
    await intake.accept(cancel(), ANSWER, key=KEY)
    checked: list[str] = []

    async def check() -> None:
        checked.append("checked")

    replay = await intake.accept(cancel(), {"other": "answer"}, key=KEY, check=check)
    assert (replay.verdict, replay.status, replay.body) == (Verdict.REPLAYED, 202, ANSWER)
    assert len(units.outbox) == 1
    assert wakes.count == 1
    assert checked == []


async def test_same_key_other_body_is_refused_422(intake: Intake, units: MemoryUnits) -> None:
    await intake.accept(cancel(), ANSWER, key=KEY)
    other = IdempotencyKey(KEY.scope, KEY.key, "hash-2")
    receipt = await intake.accept(cancel(), ANSWER, key=other)
    assert receipt.verdict is Verdict.KEY_REUSED
    assert len(units.outbox) == 1
    with pytest.raises(Problem) as refused:
        refusal(None, receipt)  # type: ignore[arg-type]  # raises before using the view
    assert (refused.value.status, refused.value.code) == (422, "IDEMPOTENCY_KEY_REUSED")


async def test_same_key_in_flight_is_refused_409(
    intake: Intake, units: MemoryUnits, store: MemoryIdempotencyStore
) -> None:
    await store.begin(KEY.scope, KEY.key, KEY.request_hash, NOW)  # a twin still running
    receipt = await intake.accept(cancel(), ANSWER, key=KEY)
    assert receipt.verdict is Verdict.IN_FLIGHT
    assert units.outbox == []
    with pytest.raises(Problem) as refused:
        refusal(None, receipt)  # type: ignore[arg-type]
    assert (refused.value.status, refused.value.code) == (409, "IDEMPOTENCY_IN_FLIGHT")


async def test_a_twin_completing_while_waited_for_is_replayed(
    units: MemoryUnits, store: MemoryIdempotencyStore, wakes: Wakes
) -> None:
    intake = Intake(units, store, lambda: NOW, TOPIC, "s" * 64, wakes, in_flight_wait_s=2.0)
    await store.begin(KEY.scope, KEY.key, KEY.request_hash, NOW)

    async def twin_finishes() -> None:
        await asyncio.sleep(0.1)
        await store.complete(KEY.scope, KEY.key, 202, ANSWER)

    finishing = asyncio.create_task(twin_finishes())
    receipt = await intake.accept(cancel(), ANSWER, key=KEY)
    await finishing
    assert (receipt.verdict, receipt.body) == (Verdict.REPLAYED, ANSWER)
    assert units.outbox == []


async def test_a_failure_while_enqueuing_abandons_the_key(
    intake: Intake, units: MemoryUnits, store: MemoryIdempotencyStore, wakes: Wakes
) -> None:
    units.fail_with = ConnectionError("outbox unavailable")
    with pytest.raises(ConnectionError):
        await intake.accept(cancel(), ANSWER, key=KEY)
    assert units.outbox == []
    assert wakes.count == 0
    assert (await store.begin(KEY.scope, KEY.key, "hash-2", NOW)).kind is BeginKind.NEW


async def test_a_refusing_check_abandons_the_key_and_enqueues_nothing(
    intake: Intake, units: MemoryUnits, store: MemoryIdempotencyStore
) -> None:
    async def check() -> None:
        raise Problem(403, "KYC_REQUIRED", "not verified")

    with pytest.raises(Problem):
        await intake.accept(cancel(), ANSWER, key=KEY, check=check)
    assert units.outbox == []
    assert (await store.begin(KEY.scope, KEY.key, KEY.request_hash, NOW)).kind is BeginKind.NEW


async def test_without_a_key_every_request_is_enqueued(
    intake: Intake, units: MemoryUnits, wakes: Wakes
) -> None:
    first = await intake.accept(cancel("c-1"), ANSWER, status=200)
    second = await intake.accept(cancel("c-2"), ANSWER, status=200)
    assert [first.verdict, second.verdict] == [Verdict.ACCEPTED, Verdict.ACCEPTED]
    assert first.status == 200
    assert [c.command_id for _, c in units.outbox] == ["c-1", "c-2"]
    assert wakes.count == 2


def test_a_keyed_retry_is_the_same_command_and_escrow() -> None:
    assert command_id_for("u-1", "k") == command_id_for("u-1", "k")
    assert command_id_for("u-1", "k") != command_id_for("u-2", "k")
    assert escrow_id_for("u-1", "k") != command_id_for("u-1", "k")
