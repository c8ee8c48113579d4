"""``Idempotency-Key`` records (SPEC §4), per user and key, in PostgreSQL or Redis.

Protocol of one keyed request:

1. ``begin``: reserve the key (state in flight) — or learn that a completed request with
   the same body exists (replay its response), that the same key came with another body
   (422 ``IDEMPOTENCY_KEY_REUSED``), or that it is still in flight (409).
2. The request does its work.  With the database store, ``complete_in`` stores the
   response in the *same* transaction as the outbox row, so an accepted command and its
   replayable response commit together.  Redis cannot join that transaction: the outbox
   commits first and the response is stored right after; a crash in between leaves the key
   in flight until it expires (``IDEMPOTENCY_TTL_HOURS``), so a retry gets 409 and never a
   second command — the command itself is already safe in the outbox.
3. ``abandon``: a request that failed before accepting anything releases its key.

Records expire after the TTL; ``purge_expired`` is the daily cleanup (Redis expires keys
itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

import asyncpg
import redis.asyncio

from escrow_stream.config import Settings
from escrow_stream.db.pool import Database


class BeginKind(StrEnum):
    NEW = "new"
    REPLAY = "replay"
    IN_FLIGHT = "in_flight"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Begin:
    kind: BeginKind
    status: int | None = None
    body: Any = None


class IdempotencyStore(Protocol):
    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin: ...

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None: ...

    async def abandon(self, user_id: str, key: str) -> None: ...

    async def purge_expired(self, now: datetime) -> int: ...


class DatabaseIdempotencyStore:
    """Table ``command_idempotency``; the default (``IDEMPOTENCY_STORAGE=database``)."""

    def __init__(self, database: Database, ttl: timedelta) -> None:
        self._database = database
        self._ttl = ttl

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            # an expired record counts as absent: remove it under the row lock first
            await conn.execute(
                "DELETE FROM command_idempotency"
                " WHERE user_id = $1 AND idempotency_key = $2 AND expires_at <= $3",
                user_id,
                key,
                now,
            )
            inserted = await conn.fetchval(
                """
                INSERT INTO command_idempotency
                       (user_id, idempotency_key, request_hash, state, created_at, expires_at)
                VALUES ($1, $2, $3, 'in_flight', $4, $5)
                ON CONFLICT (user_id, idempotency_key) DO NOTHING
                RETURNING 1
                """,
                user_id,
                key,
                request_hash,
                now,
                now + self._ttl,
            )
            if inserted:
                return Begin(BeginKind.NEW)
            row = await conn.fetchrow(
                "SELECT request_hash, state, response_status, response_body"
                " FROM command_idempotency WHERE user_id = $1 AND idempotency_key = $2",
                user_id,
                key,
            )
        return _existing(row, request_hash)

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        pool = await self._database.pool()
        async with pool.acquire() as conn:
            await self.complete_in(conn, user_id, key, status, body)

    async def complete_in(
        self, conn: asyncpg.Connection, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """Step 2 inside the caller's transaction (the one that writes the outbox row)."""
        await conn.execute(
            "UPDATE command_idempotency SET state = 'completed', response_status = $3,"
            " response_body = $4 WHERE user_id = $1 AND idempotency_key = $2",
            user_id,
            key,
            status,
            body,
        )

    async def abandon(self, user_id: str, key: str) -> None:
        pool = await self._database.pool()
        await pool.execute(
            "DELETE FROM command_idempotency WHERE user_id = $1 AND idempotency_key = $2"
            " AND state = 'in_flight'",
            user_id,
            key,
        )

    async def purge_expired(self, now: datetime) -> int:
        pool = await self._database.pool()
        status = await pool.execute("DELETE FROM command_idempotency WHERE expires_at <= $1", now)
        return int(status.split()[-1])


class RedisIdempotencyStore:
    """``IDEMPOTENCY_STORAGE=redis``: one hash per (user, key), expiring with the TTL."""

    def __init__(self, client: redis.asyncio.Redis, ttl: timedelta, prefix: str = "idem") -> None:
        self._redis = client
        self._ttl_s = int(ttl.total_seconds())
        self._prefix = prefix

    def _key(self, user_id: str, key: str) -> str:
        return f"{self._prefix}:{len(user_id)}:{user_id}:{key}"

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        name = self._key(user_id, key)
        record = json.dumps({"hash": request_hash, "state": "in_flight"})
        # SET NX EX: atomic reservation; Redis expiry is the TTL (``now`` is not needed)
        if await self._redis.set(name, record, nx=True, ex=self._ttl_s):
            return Begin(BeginKind.NEW)
        raw = await self._redis.get(name)
        if raw is None:  # expired between the two calls: try once more
            if await self._redis.set(name, record, nx=True, ex=self._ttl_s):
                return Begin(BeginKind.NEW)
            raw = await self._redis.get(name)
        if raw is None:  # expired and taken again by a concurrent request: it is in flight
            return Begin(BeginKind.IN_FLIGHT)
        stored = json.loads(raw)
        return _existing(
            {
                "request_hash": stored["hash"],
                "state": stored["state"],
                "response_status": stored.get("status"),
                "response_body": stored.get("body"),
            },
            request_hash,
        )

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        name = self._key(user_id, key)
        raw = await self._redis.get(name)
        stored = json.loads(raw) if raw is not None else {}
        stored.update(state="completed", status=status, body=body)
        await self._redis.set(name, json.dumps(stored), keepttl=True, xx=True)

    async def abandon(self, user_id: str, key: str) -> None:
        name = self._key(user_id, key)
        raw = await self._redis.get(name)
        if raw is not None and json.loads(raw).get("state") == "in_flight":
            await self._redis.delete(name)

    async def purge_expired(self, now: datetime) -> int:
        return 0  # Redis expires the keys itself


def _existing(row: Any, request_hash: str) -> Begin:
    if row["request_hash"] != request_hash:
        return Begin(BeginKind.MISMATCH)
    if row["state"] != "completed":
        return Begin(BeginKind.IN_FLIGHT)
    return Begin(BeginKind.REPLAY, row["response_status"], row["response_body"])


def build_idempotency_store(settings: Settings, database: Database) -> IdempotencyStore:
    """The store ``IDEMPOTENCY_STORAGE`` names (config requires REDIS_URL for redis)."""
    ttl = timedelta(hours=settings.idempotency_ttl_hours)
    if settings.idempotency_storage == "redis":
        assert settings.redis_url is not None
        client = redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value())
        return RedisIdempotencyStore(client, ttl)
    return DatabaseIdempotencyStore(database, ttl)
