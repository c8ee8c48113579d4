"""One contract, every idempotency backend (STYLE habit 6): PostgreSQL, Redis, and the fake."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio
from pydantic import SecretStr

from escrow_stream.config import Settings
from escrow_stream.db.pool import Database
from escrow_stream.db.unit_of_work import PostgresUnits
from escrow_stream.idempotency import (
    BeginKind,
    DatabaseIdempotencyStore,
    FallbackIdempotencyStore,
    IdempotencyStore,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    build_idempotency_store,
)
from escrow_stream.redisconn import redis_client
from tests.harness import free_port, stack_environ

pytestmark = pytest.mark.integration

TTL = timedelta(hours=24)
LEASE = timedelta(seconds=60)
SECOND = timedelta(seconds=1)
#: Far in the past, so a purge at NOW cannot touch records other test runs hold live.
NOW = datetime(2020, 3, 1, 12, 0, tzinfo=UTC)
BODY = {"escrowId": "e-1", "commandId": "c-1", "status": "ACCEPTED"}


class IdempotencyContract:
    """What the gateway relies on; subclasses provide the ``store`` fixture."""

    #: Whether ``purge_expired`` deletes (Redis expires keys itself and returns 0).
    purge_deletes = True

    @pytest.fixture
    def user(self) -> str:
        return f"idem-{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    async def units(self, stack_settings: Settings) -> AsyncIterator[PostgresUnits]:
        database = Database(stack_settings)
        yield PostgresUnits(database)
        await database.close()

    async def test_complete_in_commits_with_the_callers_unit_of_work(
        self, store: IdempotencyStore, units: PostgresUnits, user: str
    ) -> None:
        await store.begin(user, "k", "h", NOW)
        with pytest.raises(RuntimeError):
            async with units.begin() as unit:
                await store.complete_in(unit, user, "k", 202, BODY)
                raise RuntimeError("the outbox insert failed")
        assert (await store.begin(user, "k", "h", NOW)).kind is BeginKind.CONFLICT_IN_FLIGHT
        async with units.begin() as unit:
            await store.complete_in(unit, user, "k", 202, BODY)
        replay = await store.begin(user, "k", "h", NOW)
        assert (replay.kind, replay.body) == (BeginKind.REPLAY, BODY)

    async def test_new_then_replay(self, store: IdempotencyStore, user: str) -> None:
        assert (await store.begin(user, "k", "hash-1", NOW)).kind is BeginKind.NEW
        await store.complete(user, "k", 202, BODY)
        replay = await store.begin(user, "k", "hash-1", NOW + SECOND)
        assert (replay.kind, replay.status, replay.body) == (BeginKind.REPLAY, 202, BODY)

    async def test_other_body_is_a_mismatch(self, store: IdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        assert (await store.begin(user, "k", "hash-2", NOW)).kind is BeginKind.MISMATCH
        await store.complete(user, "k", 202, BODY)
        assert (await store.begin(user, "k", "hash-2", NOW)).kind is BeginKind.MISMATCH

    async def test_same_body_in_flight_conflicts(self, store: IdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        again = await store.begin(user, "k", "hash-1", NOW + LEASE - SECOND)
        assert again.kind is BeginKind.CONFLICT_IN_FLIGHT

    async def test_keys_are_per_user(self, store: IdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        assert (await store.begin(user + "-2", "k", "hash-2", NOW)).kind is BeginKind.NEW
        # the user's length is part of the record's name: ("a:b", "c") is not ("a", "b:c")
        assert (await store.begin(f"{user}:x", "k", "h", NOW)).kind is BeginKind.NEW
        assert (await store.begin(user, "x:k", "h", NOW)).kind is BeginKind.NEW

    async def test_abandon_frees_the_key(self, store: IdempotencyStore, user: str) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        await store.abandon(user, "k")
        assert (await store.begin(user, "k", "hash-2", NOW)).kind is BeginKind.NEW

    async def test_abandon_keeps_a_completed_record(
        self, store: IdempotencyStore, user: str
    ) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        await store.complete(user, "k", 202, BODY)
        await store.abandon(user, "k")
        assert (await store.begin(user, "k", "hash-1", NOW)).kind is BeginKind.REPLAY

    async def test_fifty_concurrent_begins_reserve_once(
        self, store: IdempotencyStore, user: str
    ) -> None:
        results = await asyncio.gather(*(store.begin(user, "k", "h", NOW) for _ in range(50)))
        kinds = [r.kind for r in results]
        assert kinds.count(BeginKind.NEW) == 1
        assert set(kinds) == {BeginKind.NEW, BeginKind.CONFLICT_IN_FLIGHT}

    async def test_fifty_concurrent_begins_on_an_expired_record_reserve_once(
        self, store: IdempotencyStore, user: str
    ) -> None:
        await store.begin(user, "k", "old", NOW)
        await store.complete(user, "k", 202, BODY)
        later = NOW + TTL + SECOND
        results = await asyncio.gather(*(store.begin(user, "k", "h", later) for _ in range(50)))
        assert [r.kind for r in results].count(BeginKind.NEW) == 1

    async def test_a_reservation_lapses_after_the_lease(
        self, store: IdempotencyStore, user: str
    ) -> None:
        """A request that died before completing does not block its key for the TTL."""
        await store.begin(user, "k", "hash-1", NOW)
        assert (await store.begin(user, "k", "hash-1", NOW + LEASE + SECOND)).kind is (
            BeginKind.NEW
        )

    async def test_a_completed_record_lives_for_the_ttl(
        self, store: IdempotencyStore, user: str
    ) -> None:
        await store.begin(user, "k", "hash-1", NOW)
        await store.complete(user, "k", 202, BODY)
        assert (await store.begin(user, "k", "hash-1", NOW + LEASE * 2)).kind is BeginKind.REPLAY
        assert (await store.begin(user, "k", "hash-1", NOW + TTL - SECOND)).kind is (
            BeginKind.REPLAY
        )
        # expired: absent, whatever the body
        assert (await store.begin(user, "k", "hash-2", NOW + TTL)).kind is BeginKind.NEW

    async def test_complete_without_a_reservation_stores_nothing(
        self, store: IdempotencyStore, user: str
    ) -> None:
        await store.complete(user, "k", 202, BODY)
        assert (await store.begin(user, "k", "hash-1", NOW)).kind is BeginKind.NEW

    async def test_purge_removes_expired_records_only(
        self, store: IdempotencyStore, user: str
    ) -> None:
        await store.begin(user, "lapsed", "h", NOW - LEASE - SECOND)
        await store.begin(user, "done", "h", NOW - TTL - SECOND)
        await store.complete(user, "done", 202, BODY)
        await store.begin(user, "live", "h", NOW)
        await store.begin(user, "kept", "h", NOW - LEASE)
        await store.complete(user, "kept", 202, BODY)
        purged = await store.purge_expired(NOW)
        assert purged >= 2 if self.purge_deletes else purged == 0
        assert (await store.begin(user, "live", "h", NOW)).kind is BeginKind.CONFLICT_IN_FLIGHT
        assert (await store.begin(user, "kept", "h", NOW)).kind is BeginKind.REPLAY
        assert (await store.begin(user, "lapsed", "h2", NOW)).kind is BeginKind.NEW
        assert (await store.begin(user, "done", "h2", NOW)).kind is BeginKind.NEW


class TestDatabaseStore(IdempotencyContract):
    @pytest.fixture
    async def database(self, stack_settings: Settings) -> AsyncIterator[Database]:
        database = Database(stack_settings)
        yield database
        await database.close()

    @pytest.fixture
    async def store(self, database: Database, user: str) -> AsyncIterator[DatabaseIdempotencyStore]:
        yield DatabaseIdempotencyStore(database, TTL, in_flight_lease=LEASE)
        pool = await database.pool()
        await pool.execute("DELETE FROM command_idempotency WHERE user_id LIKE $1", f"{user}%")


class TestRedisStore(IdempotencyContract):
    purge_deletes = False

    @pytest.fixture
    async def client(self, stack_settings: Settings) -> AsyncIterator[redis.asyncio.Redis]:
        assert stack_settings.redis_url is not None  # db 15 of the local Redis
        client = redis.asyncio.Redis.from_url(stack_settings.redis_url.get_secret_value())
        yield client
        await client.aclose()

    @pytest.fixture
    async def store(self, client: redis.asyncio.Redis) -> AsyncIterator[RedisIdempotencyStore]:
        prefix = f"test-idempotency-{uuid.uuid4().hex[:10]}"
        yield RedisIdempotencyStore(client, TTL, prefix=prefix, in_flight_lease=LEASE)
        keys = [k async for k in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)

    async def test_redis_forgets_a_reservation_after_the_lease_and_a_record_after_the_ttl(
        self, store: RedisIdempotencyStore, client: redis.asyncio.Redis, user: str
    ) -> None:
        await store.begin(user, "k", "h", datetime.now(UTC))
        lease_ms = await client.pttl(store.key(user, "k"))
        assert 0 < lease_ms <= LEASE.total_seconds() * 1000
        await store.complete(user, "k", 202, BODY)
        ttl_ms = await client.pttl(store.key(user, "k"))
        assert LEASE.total_seconds() * 1000 < ttl_ms <= TTL.total_seconds() * 1000


class TestFallbackStoreWithRedisDown(IdempotencyContract):
    """``IDEMPOTENCY_STORAGE=redis`` while Redis cannot be reached: the same contract, kept
    by the database store (a Redis client on a port where nothing listens)."""

    @pytest.fixture
    async def store(
        self, stack_settings: Settings, user: str
    ) -> AsyncIterator[FallbackIdempotencyStore]:
        database = Database(stack_settings)
        nowhere = stack_settings.model_copy(
            update={"redis_url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")}
        )
        dead = redis_client(nowhere)
        assert dead is not None
        yield FallbackIdempotencyStore(
            RedisIdempotencyStore(dead, TTL, in_flight_lease=LEASE),
            DatabaseIdempotencyStore(database, TTL, in_flight_lease=LEASE),
        )
        pool = await database.pool()
        await pool.execute("DELETE FROM command_idempotency WHERE user_id LIKE $1", f"{user}%")
        await dead.aclose()
        await database.close()

    async def test_redis_down_keeps_records_in_the_database(
        self, store: FallbackIdempotencyStore, stack_settings: Settings, user: str
    ) -> None:
        assert (await store.begin(user, "k", "h", NOW)).kind is BeginKind.NEW
        database = Database(stack_settings)
        try:
            async with PostgresUnits(database).begin() as unit:
                await store.complete_in(unit, user, "k", 202, BODY)
                # in the unit's own transaction, not after it
                assert (
                    await unit.connection.fetchval(
                        "SELECT state FROM command_idempotency WHERE user_id = $1", user
                    )
                    == "completed"
                )
            pool = await database.pool()
            state = await pool.fetchval(
                "SELECT state FROM command_idempotency WHERE user_id = $1", user
            )
        finally:
            await database.close()
        assert state == "completed"
        assert (await store.begin(user, "k", "h", NOW)).kind is BeginKind.REPLAY


class TestFallbackStoreWithRedisUp(IdempotencyContract):
    """With Redis reachable the fallback store is Redis: nothing reaches the database."""

    purge_deletes = False

    @pytest.fixture
    async def store(self, stack_settings: Settings) -> AsyncIterator[IdempotencyStore]:
        assert stack_settings.redis_url is not None
        client = redis.asyncio.Redis.from_url(stack_settings.redis_url.get_secret_value())
        prefix = f"test-idempotency-{uuid.uuid4().hex[:10]}"
        yield FallbackIdempotencyStore(
            RedisIdempotencyStore(client, TTL, prefix=prefix, in_flight_lease=LEASE),
            MemoryIdempotencyStore(TTL, in_flight_lease=LEASE),  # must stay unused
        )
        keys = [k async for k in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


class TestMemoryStore(IdempotencyContract):
    """The fake unit tests use must keep the same contract."""

    @pytest.fixture
    def store(self) -> MemoryIdempotencyStore:
        return MemoryIdempotencyStore(TTL, in_flight_lease=LEASE)


async def test_the_factory_follows_idempotency_storage(stack_settings: Settings) -> None:
    database = Database(stack_settings)
    assert stack_settings.redis_url is not None
    client = redis.asyncio.Redis.from_url(stack_settings.redis_url.get_secret_value())
    try:
        as_db = stack_settings.model_copy(update={"idempotency_storage": "database"})
        as_redis = stack_settings.model_copy(update={"idempotency_storage": "redis"})
        assert isinstance(
            build_idempotency_store(as_db, database, client), DatabaseIdempotencyStore
        )
        assert isinstance(
            build_idempotency_store(as_redis, database, client), FallbackIdempotencyStore
        )
        with pytest.raises(ValueError, match="Redis client"):
            build_idempotency_store(as_redis, database, None)
    finally:
        await client.aclose()
        await database.close()


async def test_the_purge_command_deletes_expired_records(stack_settings: Settings) -> None:
    """``escrow-stream idempotency purge`` (the CronJob's command) empties what has expired."""
    user = f"idem-{uuid.uuid4().hex[:12]}"
    database = Database(stack_settings)
    store = DatabaseIdempotencyStore(database, TTL)
    try:
        await store.begin(user, "done", "h", NOW)
        await store.complete(user, "done", 202, BODY)
        assert (await store.begin(user, "done", "h", NOW)).kind is BeginKind.REPLAY
        purge = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "escrow_stream.cli",
            "idempotency",
            "purge",
            env={**stack_environ(), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(purge.communicate(), timeout=120)
        assert purge.returncode == 0, err.decode()
        purged = int(out.decode().split()[0])
        assert purged >= 1, out.decode()
        assert (await store.begin(user, "done", "h2", NOW)).kind is BeginKind.NEW
    finally:
        await database.close()
