"""One contract, every idempotency backend (STYLE habit 6): PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio

from escrow_stream.config import Settings
from escrow_stream.db.pool import Database
from escrow_stream.idempotency import (
    BeginKind,
    DatabaseIdempotencyStore,
    IdempotencyStore,
    RedisIdempotencyStore,
)

pytestmark = pytest.mark.integration

TTL = timedelta(hours=24)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class IdempotencyContract:
    """Subclasses provide ``store`` (a fixture) and whether expiry follows the given ``now``."""

    clock_driven_expiry = True

    @pytest.fixture
    def user(self) -> str:
        return f"user-{uuid.uuid4().hex[:10]}"

    async def test_new_then_replay(self, store: IdempotencyStore, user: str) -> None:
        assert (await store.begin(user, "k", "hash-1", NOW)).kind is BeginKind.NEW
        await store.complete(user, "k", 202, {"escrowId": "e-1", "status": "ACCEPTED"})
        replay = await store.begin(user, "k", "hash-1", NOW)
        assert replay.kind is BeginKind.REPLAY
        assert (replay.status, replay.body) == (202, {"escrowId": "e-1", "status": "ACCEPTED"})

    async def test_other_body_is_a_mismatch(self, store: IdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        await store.complete(user, "k", 202, {})
        assert (await store.begin(user, "k", "hash-2", NOW)).kind is BeginKind.MISMATCH

    async def test_in_flight_twin(self, store: IdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        assert (await store.begin(user, "k", "hash-1", NOW)).kind is BeginKind.IN_FLIGHT

    async def test_keys_are_per_user(self, store: IdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        assert (await store.begin(user + "-2", "k", "hash-2", NOW)).kind is BeginKind.NEW

    async def test_abandon_frees_the_key(self, store: IdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        await store.abandon(user, "k")
        assert (await store.begin(user, "k", "hash-2", NOW)).kind is BeginKind.NEW

    async def test_abandon_keeps_a_completed_record(
        self, store: IdempotencyStore, user: str
    ) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        await store.complete(user, "k", 202, {"a": 1})
        await store.abandon(user, "k")
        assert (await store.begin(user, "k", "hash-1", NOW)).kind is BeginKind.REPLAY

    async def test_fifty_concurrent_begins_reserve_once(
        self, store: IdempotencyStore, user: str
    ) -> None:
        results = await asyncio.gather(*(store.begin(user, "k", "h", NOW) for _ in range(50)))
        kinds = [r.kind for r in results]
        assert kinds.count(BeginKind.NEW) == 1
        assert set(kinds) == {BeginKind.NEW, BeginKind.IN_FLIGHT}

    async def test_expired_records_count_as_absent(
        self, store: IdempotencyStore, user: str
    ) -> None:
        if not self.clock_driven_expiry:
            pytest.skip("Redis expires keys on its own clock (EX); covered by its TTL test")
        await store.begin(user, "k", "hash-1", NOW)
        await store.complete(user, "k", 202, {})
        later = NOW + TTL + timedelta(seconds=1)
        assert (await store.begin(user, "k", "hash-2", later)).kind is BeginKind.NEW


class TestDatabaseStore(IdempotencyContract):
    @pytest.fixture
    async def store(self, stack_settings: Settings) -> AsyncIterator[DatabaseIdempotencyStore]:
        database = Database(stack_settings)
        yield DatabaseIdempotencyStore(database, TTL)
        await database.close()

    async def test_purge_removes_only_expired(
        self, store: DatabaseIdempotencyStore, user: str
    ) -> None:
        await store.begin(user, "old", "h", NOW - TTL - timedelta(hours=1))
        await store.begin(user, "fresh", "h", NOW)
        assert await store.purge_expired(NOW) >= 1
        assert (await store.begin(user, "fresh", "h", NOW)).kind is BeginKind.IN_FLIGHT
        assert (await store.begin(user, "old", "h", NOW)).kind is BeginKind.NEW


class TestRedisStore(IdempotencyContract):
    clock_driven_expiry = False

    @pytest.fixture
    async def store(self, stack_settings: Settings) -> AsyncIterator[RedisIdempotencyStore]:
        assert stack_settings.redis_url is not None
        client = redis.asyncio.Redis.from_url(stack_settings.redis_url.get_secret_value())
        prefix = f"test-idem-{uuid.uuid4().hex[:8]}"
        yield RedisIdempotencyStore(client, TTL, prefix=prefix)
        keys = [k async for k in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()

    async def test_records_carry_the_ttl(self, store: RedisIdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "h", NOW)
        ttl_s = await store._redis.ttl(store._key(user, "k"))
        assert TTL.total_seconds() - 60 < ttl_s <= TTL.total_seconds()
        await store.complete(user, "k", 202, {})
        assert await store._redis.ttl(store._key(user, "k")) > 0  # completion keeps the TTL
