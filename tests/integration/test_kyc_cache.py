"""The KYC directory's cache of VERIFIED users on the local PostgreSQL: two directories on
two pools, each listening on a connection of its own, as two workers do."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from escrow_stream.config import Settings
from escrow_stream.db.kyc import CHANNEL, KycDirectory
from escrow_stream.db.pool import Database

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0


async def until(what: str, check: Callable[[], Awaitable[bool] | bool]) -> None:
    """Poll ``check`` until it is true, or fail after ``DEADLINE_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        answer = check()
        if not isinstance(answer, bool):
            answer = await answer
        if answer:
            return
        if loop.time() >= deadline:
            pytest.fail(f"not within {DEADLINE_S:.0f} s: {what}")
        await asyncio.sleep(0.02)


class Worker:
    """One worker's directory: its own pool and its own listening connection."""

    def __init__(self, settings: Settings, name: str, **kwargs: Any) -> None:
        self.name = f"kyc-test-{name}-{uuid.uuid4().hex[:8]}"  # its listener's application_name
        self.database = Database(settings)
        self.directory = KycDirectory(self.database, **kwargs)
        dsn = settings.database_url.get_secret_value()
        self._connect = functools.partial(
            asyncpg.connect, dsn, server_settings={"application_name": self.name}
        )
        self.refuse = False  # True: PostgreSQL is unreachable for its listener
        self.task: asyncio.Task[None] | None = None

    async def connect(self) -> asyncpg.Connection:
        if self.refuse:
            raise ConnectionRefusedError(f"{self.name}: refused by the test")
        return await self._connect()

    async def start(self) -> None:
        self.task = asyncio.create_task(self.directory.listen(self.connect, retry_s=0.05))
        await until(f"{self.name} listens", lambda: self.directory.listening)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task
        await self.database.close()


@asynccontextmanager
async def workers(settings: Settings, count: int, **kwargs: Any) -> AsyncIterator[list[Worker]]:
    started = [Worker(settings, str(i), **kwargs) for i in range(count)]
    try:
        for worker in started:
            await worker.start()
        yield started
    finally:
        for worker in started:
            await worker.stop()


@pytest.fixture
async def db(stack_settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection: writes behind the directories' backs (no notification)."""
    conn = await asyncpg.connect(stack_settings.database_url.get_secret_value())
    yield conn
    await conn.close()


def user() -> str:
    return f"kyc-user-{uuid.uuid4().hex[:10]}"


async def set_silently(conn: asyncpg.Connection, user_id: str, status: str) -> None:
    """Change a status without notifying anyone: only a lookup that asks PostgreSQL sees it."""
    await conn.execute(
        "INSERT INTO kyc_status (user_id, status, updated_by) VALUES ($1, $2, 'test')"
        " ON CONFLICT (user_id) DO UPDATE SET status = EXCLUDED.status",
        user_id,
        status,
    )


async def test_a_revocation_on_one_worker_is_seen_by_the_others_lookups(
    stack_settings: Settings, db: asyncpg.Connection
) -> None:
    u = user()
    async with workers(stack_settings, 2) as (a, b):
        generation = b.directory.generation
        await a.directory.set_status(u, "VERIFIED", updated_by="test")
        await until("b has the notification", lambda: b.directory.generation > generation)
        assert await b.directory.verified(frozenset({u})) == {u}
        # b answers from its cache now: a change nobody announced is not seen there ...
        await set_silently(db, u, "PENDING")
        assert await b.directory.verified(frozenset({u})) == {u}
        # ... but the KYC endpoint's write is, on the writing worker at once and on the other
        # as soon as the notification arrives
        await a.directory.set_status(u, "REJECTED", updated_by="test")
        assert await a.directory.verified(frozenset({u})) == frozenset()
        await until(
            "worker b sees the revocation",
            lambda: _lacks(b.directory, u),
        )
        # verified again: both see it (nothing negative is cached)
        await a.directory.set_status(u, "VERIFIED", updated_by="test")
        assert await b.directory.verified(frozenset({u})) == {u}


async def _lacks(directory: KycDirectory, user_id: str) -> bool:
    return user_id not in await directory.verified(frozenset({user_id}))


async def test_the_cache_is_bypassed_while_the_listener_is_down(
    stack_settings: Settings, db: asyncpg.Connection
) -> None:
    u = user()
    await set_silently(db, u, "VERIFIED")
    # never started: every lookup asks PostgreSQL
    idle = Worker(stack_settings, "idle")
    try:
        assert await idle.directory.verified(frozenset({u})) == {u}
        await set_silently(db, u, "PENDING")
        assert await idle.directory.verified(frozenset({u})) == frozenset()
    finally:
        await idle.stop()

    await set_silently(db, u, "VERIFIED")
    async with workers(stack_settings, 1) as (b,):
        assert await b.directory.verified(frozenset({u})) == {u}  # cached from here on
        # the listening connection dies (a PostgreSQL restart, a network cut) and cannot
        # come back for now
        b.refuse = True
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1",
            b.name,
        )
        assert killed == 1
        await until("the cache is off", lambda: not b.directory.listening)
        await set_silently(db, u, "PENDING")
        assert await b.directory.verified(frozenset({u})) == frozenset()
        await set_silently(db, u, "VERIFIED")
        assert await b.directory.verified(frozenset({u})) == {u}  # asked, and not kept:
        await set_silently(db, u, "PENDING")
        assert await b.directory.verified(frozenset({u})) == frozenset()
        # it reconnects and caches again, from empty
        b.refuse = False
        await until("the listener is back", lambda: b.directory.listening)
        await set_silently(db, u, "VERIFIED")
        assert await b.directory.verified(frozenset({u})) == {u}
        await set_silently(db, u, "PENDING")
        assert await b.directory.verified(frozenset({u})) == {u}


async def test_a_read_begun_before_a_notification_is_not_cached(
    stack_settings: Settings, db: asyncpg.Connection
) -> None:
    u = user()
    await set_silently(db, u, "VERIFIED")
    locker = await asyncpg.connect(stack_settings.database_url.get_secret_value())
    async with workers(stack_settings, 1) as (b,):
        try:
            # hold b's query up until a notification has reached b
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("LOCK TABLE kyc_status IN ACCESS EXCLUSIVE MODE")
            lookup = asyncio.create_task(b.directory.verified(frozenset({u})))
            await until("b's query waits for the lock", lambda: _waiting_on_lock(db))
            generation = b.directory.generation
            await db.execute("SELECT pg_notify($1, $2)", CHANNEL, user())
            await until("b has the notification", lambda: b.directory.generation > generation)
            await transaction.rollback()
            assert await lookup == {u}  # true when it was read ...
        finally:
            await locker.close()
        # ... but not kept: a change nobody announced is seen by the next lookup
        await set_silently(db, u, "PENDING")
        assert await b.directory.verified(frozenset({u})) == frozenset()


async def _waiting_on_lock(conn: asyncpg.Connection) -> bool:
    waiting: int = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'kyc_status'::regclass"
    )
    return waiting > 0


async def test_the_cache_is_bounded(stack_settings: Settings, db: asyncpg.Connection) -> None:
    users = [user() for _ in range(3)]
    for u in users:
        await set_silently(db, u, "VERIFIED")
    async with workers(stack_settings, 1, entries_max=2) as (b,):
        for u in users:
            assert await b.directory.verified(frozenset({u})) == {u}
        for u in users:
            await set_silently(db, u, "PENDING")
        # the oldest entry made room for the newest: asked again, it is no longer VERIFIED
        assert await b.directory.verified(frozenset(users)) == set(users[1:])
