"""The outbox on real PostgreSQL and Kafka: order, transactions, two publishers, failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from escrow_stream.agents import relay
from escrow_stream.agents.relay import (
    ATTEMPTS_MAX,
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    OutboxPublisher,
    OutboxRelay,
)
from escrow_stream.clock import utc_now
from escrow_stream.config import Settings
from escrow_stream.db import outbox
from escrow_stream.db.pool import Database
from escrow_stream.retry import backoff_s
from escrow_stream.signing import signature_headers, verify
from tests.harness import Stack, migrated_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: aiokafka refuses a message above its 1 MiB max_request_size before sending it.
TOO_LARGE_BYTES = 1_100_000


@pytest.fixture
async def stack(tmp_path: Path, stack_settings: Settings) -> Stack:
    stack = Stack.create(tmp_path)
    await stack.create_topics()
    return stack


@pytest.fixture
async def database(stack: Stack) -> AsyncIterator[Database]:
    """A migrated database of its own: the publisher claims every due row it can see."""
    async with migrated_database(stack.settings, "outbox") as settings:
        stack.settings = settings
        database = Database(settings)
        try:
            yield database
        finally:
            await database.close()


async def enqueue_all(
    database: Database,
    stack: Stack,
    rows: list[tuple[str, Any]],
    headers: list[tuple[str, bytes]] | None = None,
) -> list[int]:
    """One transaction; ``payload`` may be bytes or JSON-able.  Returns the row ids."""
    pool = await database.pool()
    ids = []
    async with pool.acquire() as conn, conn.transaction():
        for key, payload in rows:
            value = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            ids.append(
                await outbox.enqueue(
                    conn,
                    stack.settings.kafka_commands_topic,
                    key,
                    value,
                    [("x-test", b"1")] if headers is None else headers,
                    key,
                )
            )
    return ids


async def published(stack: Stack, expected: int, timeout_s: float = 30) -> list[Any]:
    return await stack.read(
        stack.settings.kafka_commands_topic, lambda rs: len(rs) >= expected, timeout_s=timeout_s
    )


def by_key(records: list[Any], field: str) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for r in records:
        grouped.setdefault(r.key.decode(), []).append(json.loads(r.value)[field])
    return grouped


async def row_state(database: Database, row_id: int) -> asyncpg.Record:
    pool = await database.pool()
    row = await pool.fetchrow("SELECT * FROM outbox WHERE id = $1", row_id)
    assert row is not None
    return row


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_rows_reach_kafka_in_order_per_key(stack: Stack, database: Database) -> None:
    run = uuid.uuid4().hex[:6]
    rows = [(f"agg-{run}-{i % 3}", {"n": i}) for i in range(30)]
    await enqueue_all(database, stack, rows)
    publisher = OutboxPublisher(stack.settings, database, utc_now)
    published_before = metric("escrow_outbox_published_total")
    try:
        assert await publisher.publish_batch() == 30
        assert metric("escrow_outbox_pending") == 0
        assert await publisher.publish_batch() == 0  # nothing is sent twice
    finally:
        await publisher.close()
    assert metric("escrow_outbox_published_total") - published_before == 30
    records = await published(stack, 30)
    assert len(records) == 30
    assert all(dict(r.headers) == {"x-test": b"1"} for r in records)
    assert by_key(records, "n") == {f"agg-{run}-{k}": list(range(k, 30, 3)) for k in range(3)}


async def test_headers_and_signatures_arrive_byte_for_byte(
    stack: Stack, database: Database
) -> None:
    secret = stack.secret()
    command = {"commandId": "c-1", "actor": {"id": "stripe", "role": "system"}}
    value = json.dumps(command).encode()
    headers = [
        *signature_headers(secret, value),
        ("x-binary", b"\xff\x00\xfe"),
        ("x-dup", b"a"),
        ("x-dup", b"b"),
    ]
    await enqueue_all(database, stack, [("escrow-1", value)], headers=headers)
    publisher = OutboxPublisher(stack.settings, database, utc_now)
    try:
        assert await publisher.publish_batch() == 1
    finally:
        await publisher.close()
    [record] = await published(stack, 1)
    assert (record.key, record.value) == (b"escrow-1", value)
    assert list(record.headers) == headers
    assert verify(secret, record.value, record.headers)


async def test_a_rolled_back_transaction_publishes_nothing(
    stack: Stack, database: Database
) -> None:
    pool = await database.pool()
    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await outbox.enqueue(conn, stack.settings.kafka_commands_topic, "k", b"{}", [], "k")
            raise RuntimeError("the request failed after the insert")
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    publisher = OutboxPublisher(stack.settings, database, utc_now)
    try:
        assert await publisher.publish_batch() == 0
    finally:
        await publisher.close()
    assert await published(stack, 1, timeout_s=3) == []


async def test_two_publishers_send_every_row_once_in_order(
    stack: Stack, database: Database
) -> None:
    run = uuid.uuid4().hex[:6]
    rows = [(f"a-{run}-{i % 20}", {"id": i}) for i in range(300)]
    await enqueue_all(database, stack, rows)
    stopping = asyncio.Event()
    publishers = [OutboxPublisher(stack.settings, database, utc_now) for _ in range(2)]
    tasks = [asyncio.create_task(p.run(stopping)) for p in publishers]
    try:
        await published(stack, 300)
        await asyncio.sleep(2)  # give a double send the chance to show up
        records = await published(stack, 301, timeout_s=5)
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
        for p in publishers:
            await p.close()
    counts = Counter(json.loads(r.value)["id"] for r in records)
    assert set(counts) == set(range(300))
    assert max(counts.values()) == 1
    assert by_key(records, "id") == {f"a-{run}-{k}": list(range(k, 300, 20)) for k in range(20)}
    pool = await database.pool()
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


async def test_notify_sends_without_waiting_for_the_poll(
    stack: Stack, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay, "POLL_INTERVAL_S", 60.0)
    publisher = OutboxPublisher(stack.settings, database, utc_now)
    stopping = asyncio.Event()
    task = asyncio.create_task(publisher.run(stopping))
    try:
        await asyncio.sleep(1)  # the first (empty) batch is done: now it sleeps 60 s
        started = time.monotonic()
        await enqueue_all(database, stack, [("notified", {"n": 1})])
        publisher.notify()
        assert len(await published(stack, 1, timeout_s=20)) == 1
        assert time.monotonic() - started < 20
    finally:
        stopping.set()
        await task
        await publisher.close()


async def test_unreachable_broker_backs_off_then_dead_letters_and_replay_recovers(
    stack: Stack, database: Database
) -> None:
    key = f"dead-{uuid.uuid4().hex[:6]}"
    [row_id] = await enqueue_all(database, stack, [(key, {"n": 1})])
    broken = stack.settings.model_copy(update={"kafka_brokers": "127.0.0.1:1"})
    now = [datetime.now(UTC)]
    publisher = OutboxPublisher(broken, database, lambda: now[0])
    dead_before = metric("escrow_outbox_dead_letters_total")
    backoffs = []
    try:
        for attempt in range(1, ATTEMPTS_MAX + 1):
            assert await publisher.publish_batch() == 0
            row = await row_state(database, row_id)
            assert row["attempts"] == attempt and row["published_at"] is None
            assert "127.0.0.1:1" in row["last_error"] or "Connection" in row["last_error"]
            backoffs.append((row["next_attempt_at"] - now[0]).total_seconds())
            if attempt < ATTEMPTS_MAX:
                assert row["dead_lettered_at"] is None
                assert metric("escrow_outbox_pending") == 1
                # not due before its backoff is over
                now[0] = row["next_attempt_at"] - timedelta(milliseconds=1)
                assert await publisher.publish_batch() == 0
                assert (await row_state(database, row_id))["attempts"] == attempt
                now[0] = row["next_attempt_at"]
    finally:
        await publisher.close()
    assert row["dead_lettered_at"] is not None
    assert metric("escrow_outbox_dead_letters_total") - dead_before == 1
    assert metric("escrow_outbox_pending") == 0
    expected = [backoff_s(a, BACKOFF_BASE_S, BACKOFF_MAX_S) for a in range(1, ATTEMPTS_MAX + 1)]
    assert backoffs == expected
    assert backoffs[:3] == [2.0, 4.0, 8.0] and backoffs[-1] == 300.0  # capped

    pool = await database.pool()
    assert await outbox.replay(pool, None, None) == 1  # no filter: the dead letters
    row = await row_state(database, row_id)
    assert (row["attempts"], row["dead_lettered_at"], row["last_error"]) == (0, None, None)
    healthy = OutboxPublisher(stack.settings, database, utc_now)
    try:
        assert await healthy.publish_batch() == 1
    finally:
        await healthy.close()
    records = await published(stack, 1)
    assert [json.loads(r.value) for r in records] == [{"n": 1}]


async def test_a_failing_row_holds_back_its_aggregate_only(
    stack: Stack, database: Database
) -> None:
    """A message Kafka refuses: later rows of its aggregate wait, other aggregates go on."""
    run = uuid.uuid4().hex[:6]
    stuck, other = f"stuck-{run}", f"other-{run}"
    big = json.dumps({"n": 0, "pad": "x" * TOO_LARGE_BYTES}).encode()
    head, follower, _ = await enqueue_all(
        database, stack, [(stuck, big), (stuck, {"n": 1}), (other, {"n": 2})]
    )
    now = [datetime.now(UTC)]
    publisher = OutboxPublisher(stack.settings, database, lambda: now[0])
    try:
        assert await publisher.publish_batch() == 1  # only the other aggregate's row
        assert (await row_state(database, head))["attempts"] == 1
        assert (await row_state(database, follower))["attempts"] == 0  # not attempted
        # the follower is due, its head is backing off: it must not overtake
        assert await publisher.publish_batch() == 0
        assert (await row_state(database, follower))["published_at"] is None
        while (await row_state(database, head))["dead_lettered_at"] is None:
            now[0] = (await row_state(database, head))["next_attempt_at"]
            assert await publisher.publish_batch() == 0
            assert (await row_state(database, follower))["attempts"] == 0
        assert (await row_state(database, head))["attempts"] == ATTEMPTS_MAX
        # a dead letter no longer holds its aggregate back
        assert await publisher.publish_batch() == 1
    finally:
        await publisher.close()
    records = await published(stack, 2)
    assert by_key(records, "n") == {other: [2], stuck: [1]}


async def test_a_row_locked_by_another_publisher_holds_back_its_aggregate(
    stack: Stack, database: Database
) -> None:
    run = uuid.uuid4().hex[:6]
    first, second = await enqueue_all(database, stack, [(run, {"n": 1}), (run, {"n": 2})])
    pool = await database.pool()
    publisher = OutboxPublisher(stack.settings, database, utc_now)
    try:
        async with pool.acquire() as conn, conn.transaction():
            # another publisher in the middle of sending the first row
            await conn.execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", first)
            assert await publisher.publish_batch() == 0
        assert await publisher.publish_batch() == 2
    finally:
        await publisher.close()
    assert by_key(await published(stack, 2), "n") == {run: [1, 2]}
    assert (await row_state(database, second))["published_at"] is not None


async def test_replay_with_filters_resends_published_rows(stack: Stack, database: Database) -> None:
    run = uuid.uuid4().hex[:6]
    await enqueue_all(database, stack, [(f"{run}-a", {"n": 1}), (f"{run}-b", {"n": 2})])
    publisher = OutboxPublisher(stack.settings, database, utc_now)
    pool = await database.pool()
    try:
        assert await publisher.publish_batch() == 2
        assert await outbox.replay(pool, None, None) == 0  # nothing dead-lettered
        assert await outbox.replay(pool, [f"{run}-a"], None) == 1
        assert await outbox.replay(pool, None, datetime.now(UTC) + timedelta(hours=1)) == 0
        assert await publisher.publish_batch() == 1
    finally:
        await publisher.close()
    records = await published(stack, 3)
    assert by_key(records, "n") == {f"{run}-a": [1, 1], f"{run}-b": [2]}


async def test_the_worker_service_relays_and_stops(stack: Stack, database: Database) -> None:
    relay = OutboxRelay(OutboxPublisher(stack.settings, database, utc_now))
    await relay.start()
    try:
        await enqueue_all(database, stack, [("service", {"n": 1})])
        assert len(await published(stack, 1)) == 1
    finally:
        await asyncio.wait_for(relay.stop(), 30)
    pool = await database.pool()
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_standalone_publisher_relays_and_stops_on_a_signal(
    stack: Stack, database: Database, tmp_path: Path, signum: signal.Signals
) -> None:
    env = {
        **stack.env,
        "DATABASE_URL": stack.settings.database_url.get_secret_value(),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    log_path = tmp_path / "publisher.log"
    log = log_path.open("wb")
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
        assert [json.loads(r.value) for r in records] == [{"n": 7}]
        proc.send_signal(signum)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    assert "outbox publisher stopped" in log_path.read_text()
