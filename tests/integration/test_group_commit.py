"""Group commit of accepted commands on real PostgreSQL: concurrent requests share a
transaction, each is answered only once its rows are committed, and a request whose writes
fail fails alone, leaving nothing of it behind."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import asyncpg
import pytest
from pydantic import SecretStr

from escrow_stream.config import Settings
from escrow_stream.db.pool import Database
from escrow_stream.db.unit_of_work import PostgresUnits, UnitOfWork
from escrow_stream.idempotency import BeginKind
from escrow_stream.idempotency.database_store import DatabaseIdempotencyStore
from escrow_stream.intake import GroupCommit, IdempotencyKey, Intake, Verdict
from escrow_stream.messages import make_command
from tests.harness import migrated_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
REQUESTS = 24
SECRET = "s" * 64


@pytest.fixture
async def database(stack_settings: Settings) -> AsyncIterator[Database]:
    """A migrated database of its own: no worker's relay takes these rows."""
    async with migrated_database(stack_settings, "group") as settings:
        database = Database(settings)
        try:
            yield database
        finally:
            await database.close()


def command(i: int) -> object:
    actor = {"id": f"buyer-{i}", "role": "user"}
    return make_command(
        actor, "CancelEscrow", f"e-{i}", {"reason": "BUYER_CANCELLED"}, f"c-{i}", NOW
    )


async def test_concurrent_requests_share_transactions_and_are_answered_once_committed(
    database: Database,
) -> None:
    store = DatabaseIdempotencyStore(database, timedelta(hours=1))
    topic = f"group-{uuid.uuid4().hex[:8]}"
    intake = Intake(PostgresUnits(database), store, lambda: NOW, topic, SECRET, lambda: None)
    pool = await database.pool()  # its other sessions see committed rows only
    committed_when_answered: list[bool] = []

    async def one(i: int) -> Verdict:
        key = IdempotencyKey(f"buyer-{i}", f"k-{i}", f"hash-{i}")
        receipt = await intake.accept(command(i), {"n": i}, key=key)  # type: ignore[arg-type]
        rows = await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE topic = $1 AND aggregate_id = $2", topic, f"e-{i}"
        )
        committed_when_answered.append(rows == 1)
        return receipt.verdict

    verdicts = [await one(0)]  # alone
    verdicts += await asyncio.gather(*(one(i) for i in range(1, REQUESTS)))
    # created_at defaults to now(): the start of the (top-level) transaction that wrote it
    transactions = await pool.fetchval(
        "SELECT count(DISTINCT created_at) FROM outbox WHERE topic = $1", topic
    )
    assert verdicts == [Verdict.ACCEPTED] * REQUESTS
    assert committed_when_answered == [True] * REQUESTS
    assert 2 <= transactions < REQUESTS  # the concurrent ones were grouped
    for i in range(REQUESTS):  # each key completed in its request's transaction
        replay = await store.begin(f"buyer-{i}", f"k-{i}", f"hash-{i}", NOW)
        assert (replay.kind, replay.status, replay.body) == (BeginKind.REPLAY, 202, {"n": i})


async def test_a_failed_request_fails_alone_and_its_batch_commits(database: Database) -> None:
    group = GroupCommit(PostgresUnits(database), batches_in_flight_max=1)
    topic = f"group-{uuid.uuid4().hex[:8]}"
    started = asyncio.Event()
    release = asyncio.Event()

    async def first(unit: UnitOfWork) -> None:  # holds the only writer until the rest wait
        started.set()
        await release.wait()
        await unit.enqueue_command(topic, command(0), SECRET)  # type: ignore[arg-type]

    async def good(unit: UnitOfWork, i: int) -> None:
        await unit.enqueue_command(topic, command(i), SECRET)  # type: ignore[arg-type]

    async def bad(unit: UnitOfWork) -> None:  # one row in, then PostgreSQL refuses a NUL
        await unit.enqueue_command(topic, command(9), SECRET)  # type: ignore[arg-type]
        await unit.connection.execute(
            "INSERT INTO outbox (aggregate_id, topic, message_key, payload, headers)"
            " VALUES ('x\x00', $1, 'k', '\\x00', '[]')",
            topic,
        )

    head = asyncio.create_task(group.write(first))
    await started.wait()
    batch = [asyncio.create_task(group.write(lambda u, i=i: good(u, i))) for i in (1, 2)]
    batch.insert(1, asyncio.create_task(group.write(bad)))  # in the same batch as 1 and 2
    release.set()
    assert await head == []
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert results[0] == [] and results[2] == [], results
    assert isinstance(results[1], asyncpg.PostgresError | ValueError), results
    pool = await database.pool()
    rows = await pool.fetch(
        "SELECT aggregate_id FROM outbox WHERE topic = $1 ORDER BY aggregate_id", topic
    )
    assert [r["aggregate_id"] for r in rows] == ["e-0", "e-1", "e-2"]  # nothing of e-9
    assert await group.write(lambda u: good(u, 3)) == []


async def test_every_request_of_a_batch_gets_the_error_when_its_unit_cannot_begin(
    stack_settings: Settings,
) -> None:
    """PostgreSQL unreachable (nothing listens on the port): the unit fails before any
    request's writes ran, and each waiting request is answered with that error at once —
    none waits for an answer that will never come (the fault test's 35 s hang)."""
    closed = _closed_port()
    dsn = stack_settings.database_url.get_secret_value()
    unreachable = dsn.replace(f":{urlsplit(dsn).port}/", f":{closed}/")
    database = Database(stack_settings.model_copy(update={"database_url": SecretStr(unreachable)}))
    group = GroupCommit(PostgresUnits(database), batches_in_flight_max=1)
    topic = f"group-{uuid.uuid4().hex[:8]}"

    async def good(unit: UnitOfWork, i: int) -> None:
        await unit.enqueue_command(topic, command(i), SECRET)  # type: ignore[arg-type]

    try:
        requests = [group.write(lambda u, i=i: good(u, i)) for i in range(5)]
        results = await asyncio.wait_for(
            asyncio.gather(*requests, return_exceptions=True), timeout=30
        )
    finally:
        await database.close()
    assert all(isinstance(r, OSError) for r in results), results


def _closed_port() -> int:
    """A local port nothing listens on: bound, never listened, released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
