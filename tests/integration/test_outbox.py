"""The outbox on real PostgreSQL and Kafka: order, transactions, two publishers, failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from escrow_stream.config import Settings
from escrow_stream.db import migrate, outbox
from escrow_stream.db.outbox import ATTEMPTS_MAX, OutboxPublisher
from escrow_stream.db.pool import Database
from tests.harness import Stack
from tests.support import unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
async def stack(tmp_path: Path, stack_settings: Settings) -> Stack:
    stack = Stack.create(tmp_path)
    await stack.create_topics()
    return stack


@pytest.fixture
async def database(stack: Stack) -> AsyncIterator[Database]:
    """A migrated database of its own: the publisher claims every due row it can see."""
    admin_url = stack.settings.database_url.get_secret_value()
    name = unique("outbox").replace("-", "_")
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    stack.settings = stack.settings.model_copy(update={"database_url": SecretStr(url)})
    await asyncio.to_thread(migrate.upgrade, stack.settings)
    database = Database(stack.settings)
    try:
        yield database
    finally:
        await database.close()
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def enqueue_all(
    database: Database, stack: Stack, rows: list[tuple[str, dict[str, Any]]]
) -> None:
    pool = await database.pool()
    async with pool.acquire() as conn, conn.transaction():
        for key, payload in rows:
            await outbox.enqueue(
                conn,
                stack.settings.kafka_commands_topic,
                key,
                json.dumps(payload).encode(),
                [("x-test", b"1")],
                key,
            )


async def published(stack: Stack, expected: int) -> list[Any]:
    return await stack.read(
        stack.settings.kafka_commands_topic, lambda rs: len(rs) >= expected, timeout_s=30
    )


async def test_rows_reach_kafka_in_order_per_key(stack: Stack, database: Database) -> None:
    run = uuid.uuid4().hex[:6]
    rows = [(f"agg-{run}-{i % 3}", {"n": i}) for i in range(30)]
    await enqueue_all(database, stack, rows)
    publisher = OutboxPublisher(stack.settings, database, lambda: datetime.now(UTC))
    try:
        assert await publisher.publish_batch() == 30
        assert await publisher.publish_batch() == 0  # nothing is sent twice
    finally:
        await publisher.close()
    records = await published(stack, 30)
    by_key: dict[str, list[int]] = {}
    for r in records:
        by_key.setdefault(r.key.decode(), []).append(json.loads(r.value)["n"])
        assert dict(r.headers) == {"x-test": b"1"}
    assert by_key == {f"agg-{run}-{k}": list(range(k, 30, 3)) for k in range(3)}


async def test_a_rolled_back_transaction_publishes_nothing(
    stack: Stack, database: Database
) -> None:
    pool = await database.pool()
    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await outbox.enqueue(conn, stack.settings.kafka_commands_topic, "k", b"{}", [], "k")
            raise RuntimeError("the request failed after the insert")
    publisher = OutboxPublisher(stack.settings, database, lambda: datetime.now(UTC))
    try:
        assert await publisher.publish_batch() == 0
    finally:
        await publisher.close()


async def test_two_publishers_send_every_row_once(stack: Stack, database: Database) -> None:
    run = uuid.uuid4().hex[:6]
    await enqueue_all(database, stack, [(f"a-{run}-{i % 20}", {"id": i}) for i in range(300)])
    stopping = asyncio.Event()
    publishers = [
        OutboxPublisher(stack.settings, database, lambda: datetime.now(UTC)) for _ in range(2)
    ]
    tasks = [asyncio.create_task(p.run(stopping)) for p in publishers]
    try:
        records = await published(stack, 300)
        await asyncio.sleep(2)  # give a double send the chance to show up
        records = await published(stack, 301)
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
        for p in publishers:
            await p.close()
    counts = Counter(json.loads(r.value)["id"] for r in records)
    assert set(counts) == set(range(300))
    assert max(counts.values()) == 1


async def test_unreachable_broker_backs_off_then_dead_letters_and_replay_recovers(
    stack: Stack, database: Database
) -> None:
    run = uuid.uuid4().hex[:6]
    key = f"dead-{run}"
    await enqueue_all(database, stack, [(key, {"n": 1})])
    broken = stack.settings.model_copy(update={"kafka_brokers": "127.0.0.1:1"})
    now = [datetime.now(UTC)]
    publisher = OutboxPublisher(broken, database, lambda: now[0])
    pool = await database.pool()
    try:
        backoffs = []
        for _ in range(ATTEMPTS_MAX):
            assert await publisher.publish_batch() == 0
            row = await pool.fetchrow(
                "SELECT attempts, next_attempt_at, dead_lettered_at FROM outbox"
                " WHERE aggregate_id = $1",
                key,
            )
            backoffs.append((row["next_attempt_at"] - now[0]).total_seconds())
            now[0] = row["next_attempt_at"] + timedelta(milliseconds=1)
    finally:
        await publisher.close()
    assert row["attempts"] == ATTEMPTS_MAX and row["dead_lettered_at"] is not None
    assert backoffs == sorted(backoffs) and backoffs[0] < backoffs[-1]  # exponential backoff

    assert await outbox.replay(pool, [key], None) == 1
    healthy = OutboxPublisher(stack.settings, database, lambda: datetime.now(UTC))
    try:
        assert await healthy.publish_batch() >= 1
    finally:
        await healthy.close()
    records = await published(stack, 1)
    assert [json.loads(r.value) for r in records if r.key.decode() == key] == [{"n": 1}]


async def test_standalone_publisher_relays_and_stops_on_sigterm(
    stack: Stack, database: Database, tmp_path: Path
) -> None:
    env = {
        **stack.env,
        "DATABASE_URL": stack.settings.database_url.get_secret_value(),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    log = (tmp_path / "publisher.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "escrow_stream.cli",
        "outbox-publisher",
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        key = f"standalone-{uuid.uuid4().hex[:6]}"
        await enqueue_all(database, stack, [(key, {"n": 7})])
        records = await published(stack, 1)
        assert [json.loads(r.value) for r in records if r.key.decode() == key] == [{"n": 7}]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    assert "outbox publisher stopped" in (tmp_path / "publisher.log").read_text()
