"""``Idempotency-Key`` records (SPEC §4), per user and key, in PostgreSQL, Redis or memory.

Protocol of one keyed request (the gateway):

1. ``begin(user, key, request_hash, now)`` reserves the key — NEW, state in flight for
   ``IN_FLIGHT_LEASE_S`` — or answers from an existing, unexpired record: REPLAY (same
   hash, completed: the stored status and body), MISMATCH (other hash: 422
   ``IDEMPOTENCY_KEY_REUSED``) or CONFLICT_IN_FLIGHT (same hash, not completed: 409).
   Concurrent begins of one (user, key) yield exactly one NEW.
2. The request does its work and, in the unit of work that writes the outbox row
   (``db.unit_of_work``), calls ``complete_in(unit, …)``: every store completes the key with
   that unit, so the accepted command and its replayable response commit together.  The
   database store writes on the unit's connection (the same transaction); a store outside
   PostgreSQL (Redis, memory) completes once the unit has committed (``after_commit``), and
   never if it rolls back.
3. Completing makes the record live for ``IDEMPOTENCY_TTL_HOURS`` from its ``begin``;
   ``abandon`` instead drops an in-flight reservation (the request failed before anything
   was accepted).  ``complete`` is step 2 without a unit (its own transaction).

Why the reservation is a short lease, not the full TTL: a process that dies between steps
1 and 3 (before the outbox commit, or — Redis — between the outbox commit and
``complete``) would otherwise leave the key in flight, answering 409 to every retry for a
whole TTL.  With the lease, a retry after ``IN_FLIGHT_LEASE_S`` gets NEW and enqueues the
command again; the gateway derives commandId (and a new escrow's id) from user + key, so
it is the *same* command and the processor applies it once (SPEC §3, rule 1), and the
retry gets the same 202 body.  The cost: a request still running after the lease could
meet a twin that was given NEW — again the same command, applied once.

With ``IDEMPOTENCY_STORAGE=redis`` the store is :class:`FallbackIdempotencyStore`: Redis,
and the database while Redis is unreachable (the seed's "fallback to database").

Expired records count as absent.  ``purge_expired`` is the daily cleanup of the database
store; Redis expires its keys itself (the key TTL follows the record's expiry).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any, Protocol

import asyncpg
import redis.asyncio
import redis.exceptions
from prometheus_client import Counter

from escrow_stream.config import Settings
from escrow_stream.db.pool import Database
from escrow_stream.db.unit_of_work import UnitOfWork

log = logging.getLogger(__name__)

#: How long a NEW reservation blocks its key if the request never completes nor abandons.
IN_FLIGHT_LEASE_S = 60.0
#: The daily purge deletes at most this many rows per statement (short locks).
PURGE_BATCH_MAX = 10_000
#: Once Redis failed, the fallback store asks it again only after this long.
PRIMARY_RETRY_AFTER_S = 5.0
#: What "Redis cannot be reached" looks like to the fallback store.
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

IDEMPOTENCY_FALLBACKS = Counter(
    "escrow_idempotency_fallbacks_total",
    "Idempotency-Key requests kept in the database store because Redis was unavailable.",
)


class BeginKind(StrEnum):
    NEW = "new"
    REPLAY = "replay"
    CONFLICT_IN_FLIGHT = "in_flight"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Begin:
    kind: BeginKind
    status: int | None = None
    body: Any = None


class IdempotencyStore(Protocol):
    """Steps 1-3 of the module docstring."""

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin: ...

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None: ...

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """Step 2: complete the key with the caller's unit of work (it commits with the
        outbox row, or not at all)."""
        ...

    async def abandon(self, user_id: str, key: str) -> None: ...

    async def purge_expired(self, now: datetime) -> int: ...


def _existing(stored_hash: str, state: str, status: int | None, body: Any, new: str) -> Begin:
    if stored_hash != new:
        return Begin(BeginKind.MISMATCH)
    if state != "completed":
        return Begin(BeginKind.CONFLICT_IN_FLIGHT)
    return Begin(BeginKind.REPLAY, status, body)


class DatabaseIdempotencyStore:
    """Table ``command_idempotency``; the default (``IDEMPOTENCY_STORAGE=database``)."""

    def __init__(
        self,
        database: Database,
        ttl: timedelta,
        in_flight_lease: timedelta = timedelta(seconds=IN_FLIGHT_LEASE_S),
    ) -> None:
        self._database = database
        self._ttl = ttl
        self._lease = in_flight_lease

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            # Insert, or take over an expired record.  ON CONFLICT DO UPDATE locks the
            # existing row even when the WHERE is false, so the SELECT below sees it.
            reserved = await conn.fetchval(
                """
                INSERT INTO command_idempotency AS r
                       (user_id, idempotency_key, request_hash, state, created_at, expires_at)
                VALUES ($1, $2, $3, 'in_flight', $4, $5)
                ON CONFLICT (user_id, idempotency_key) DO UPDATE
                   SET request_hash = EXCLUDED.request_hash, state = 'in_flight',
                       response_status = NULL, response_body = NULL,
                       created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
                 WHERE r.expires_at <= $4
                RETURNING 1
                """,
                user_id,
                key,
                request_hash,
                now,
                now + self._lease,
            )
            if reserved:
                return Begin(BeginKind.NEW)
            row = await conn.fetchrow(
                "SELECT request_hash, state, response_status, response_body"
                " FROM command_idempotency WHERE user_id = $1 AND idempotency_key = $2",
                user_id,
                key,
            )
        assert row is not None  # locked by the upsert above
        return _existing(
            row["request_hash"],
            row["state"],
            row["response_status"],
            row["response_body"],
            request_hash,
        )

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        pool = await self._database.pool()
        async with pool.acquire() as conn:
            await self._complete_on(conn, user_id, key, status, body)

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """Step 2 in the unit's own transaction (the one that writes the outbox row)."""
        await self._complete_on(unit.connection, user_id, key, status, body)

    async def _complete_on(
        self, conn: asyncpg.Connection, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """``conn`` must come from a pool made by ``db.pool.create_pool`` (its jsonb codec)."""
        updated = await conn.execute(
            """
            UPDATE command_idempotency
               SET state = 'completed', response_status = $3, response_body = $4,
                   expires_at = created_at + $5::interval
             WHERE user_id = $1 AND idempotency_key = $2 AND state = 'in_flight'
            """,
            user_id,
            key,
            status,
            body,
            self._ttl,
        )
        if updated.endswith(" 0"):
            log.warning("idempotency: no reservation left to complete for user %s", user_id)

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
        purged = 0
        while True:
            status = await pool.execute(
                """
                DELETE FROM command_idempotency
                 WHERE (user_id, idempotency_key) IN (
                        SELECT user_id, idempotency_key FROM command_idempotency
                         WHERE expires_at <= $1 LIMIT $2)
                   AND expires_at <= $1
                """,
                now,
                PURGE_BATCH_MAX,
            )
            deleted = int(status.split()[-1])
            purged += deleted
            if deleted < PURGE_BATCH_MAX:
                return purged


# KEYS[1] record; ARGV: hash, now_ms, lease_ms.  Returns nil (reserved) or the live record.
_BEGIN_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'hash', 'state', 'status', 'body', 'expires_ms')
if cur[1] and tonumber(cur[5]) and tonumber(cur[5]) > tonumber(ARGV[2]) then
  return {cur[1], cur[2], cur[3], cur[4]}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'state', 'in_flight', 'created_ms', ARGV[2],
           'expires_ms', string.format('%.0f', tonumber(ARGV[2]) + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return nil
"""

# KEYS[1] record; ARGV: status, body (JSON), ttl_ms.  Returns 1 when completed.
_COMPLETE_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'in_flight' then return 0 end
local created = tonumber(redis.call('HGET', KEYS[1], 'created_ms'))
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[1], 'body', ARGV[2],
           'expires_ms', string.format('%.0f', created + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] record.  Deletes it only while in flight.
_ABANDON_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'in_flight' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisIdempotencyStore:
    """``IDEMPOTENCY_STORAGE=redis``: one hash per (user, key), changed only by Lua scripts.

    Expiry follows the injected ``now`` (the record's ``expires_ms``); the key's Redis TTL
    (lease, then TTL from completion) only makes Redis forget it no earlier than that.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        ttl: timedelta,
        prefix: str = "escrow:idempotency",
        in_flight_lease: timedelta = timedelta(seconds=IN_FLIGHT_LEASE_S),
    ) -> None:
        self._redis = client
        self._ttl_ms = int(ttl.total_seconds() * 1000)
        self._lease_ms = int(in_flight_lease.total_seconds() * 1000)
        self._prefix = prefix
        self._begin = client.register_script(_BEGIN_LUA)
        self._complete = client.register_script(_COMPLETE_LUA)
        self._abandon = client.register_script(_ABANDON_LUA)

    def key(self, user_id: str, key: str) -> str:
        """The Redis key of a record (the user's length keeps ``a:b`` + ``c`` apart)."""
        return f"{self._prefix}:{len(user_id)}:{user_id}:{key}"

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        now_ms = int(now.timestamp() * 1000)
        found = await self._begin(
            keys=[self.key(user_id, key)], args=[request_hash, now_ms, self._lease_ms]
        )
        if found is None:
            return Begin(BeginKind.NEW)
        stored_hash, state, status, body = found
        return _existing(
            _text(stored_hash),
            _text(state),
            int(status) if status is not None else None,
            json.loads(body) if body is not None else None,
            request_hash,
        )

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        done = await self._complete(
            keys=[self.key(user_id, key)], args=[status, json.dumps(body), self._ttl_ms]
        )
        if not done:
            log.warning("idempotency: no reservation left to complete for user %s", user_id)

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """Redis is outside the outbox transaction: completes once the unit has committed."""
        unit.after_commit(partial(self.complete, user_id, key, status, body))

    async def abandon(self, user_id: str, key: str) -> None:
        await self._abandon(keys=[self.key(user_id, key)])

    async def purge_expired(self, now: datetime) -> int:
        return 0  # Redis expires the keys itself


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@dataclass
class _Record:
    request_hash: str
    state: str
    created_at: datetime
    expires_at: datetime
    status: int | None = None
    body: Any = None


class MemoryIdempotencyStore:
    """The in-memory fake for unit tests (one process; atomic because it never awaits)."""

    def __init__(
        self, ttl: timedelta, in_flight_lease: timedelta = timedelta(seconds=IN_FLIGHT_LEASE_S)
    ) -> None:
        self._ttl = ttl
        self._lease = in_flight_lease
        self._records: dict[tuple[str, str], _Record] = {}

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        record = self._records.get((user_id, key))
        if record is not None and record.expires_at > now:
            return _existing(
                record.request_hash, record.state, record.status, record.body, request_hash
            )
        self._records[(user_id, key)] = _Record(request_hash, "in_flight", now, now + self._lease)
        return Begin(BeginKind.NEW)

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        record = self._records.get((user_id, key))
        if record is not None and record.state == "in_flight":
            record.state, record.status, record.body = "completed", status, body
            record.expires_at = record.created_at + self._ttl

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """Completes once the unit has committed, as Redis does."""
        unit.after_commit(partial(self.complete, user_id, key, status, body))

    async def abandon(self, user_id: str, key: str) -> None:
        record = self._records.get((user_id, key))
        if record is not None and record.state == "in_flight":
            del self._records[(user_id, key)]

    async def purge_expired(self, now: datetime) -> int:
        expired = [k for k, r in self._records.items() if r.expires_at <= now]
        for k in expired:
            del self._records[k]
        return len(expired)


class FallbackIdempotencyStore:
    """``IDEMPOTENCY_STORAGE=redis`` as the seed asks: Redis, and the database store for
    every request that begins while Redis cannot be reached.

    A request stays with the store its ``begin`` used (complete / abandon go there too).
    While Redis is down, a key begun in Redis earlier is unknown to the database: a retry
    then gets NEW, and because the gateway derives the commandId from user + key it
    enqueues the *same* command, which the processor applies once (SPEC §3, rule 1) — the
    same argument as for a lapsed lease.  The answer is the same 202 body.
    """

    def __init__(
        self,
        primary: IdempotencyStore,
        fallback: IdempotencyStore,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._monotonic = monotonic
        #: Redis is not asked again before this (monotonic seconds) once it failed
        self._primary_down_until = 0.0
        #: (user, key) of requests begun (NEW) in the fallback and not yet finished
        self._in_fallback: set[tuple[str, str]] = set()

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        if self._monotonic() >= self._primary_down_until:
            try:
                return await self._primary.begin(user_id, key, request_hash, now)
            except UNREACHABLE as exc:
                self._primary_down_until = self._monotonic() + PRIMARY_RETRY_AFTER_S
                log.warning("idempotency: Redis unavailable (%r); using the database", exc)
        IDEMPOTENCY_FALLBACKS.inc()
        begun = await self._fallback.begin(user_id, key, request_hash, now)
        if begun.kind is BeginKind.NEW:
            self._in_fallback.add((user_id, key))
        return begun

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        if (user_id, key) in self._in_fallback:
            self._in_fallback.discard((user_id, key))
            await self._fallback.complete(user_id, key, status, body)
            return
        try:
            await self._primary.complete(user_id, key, status, body)
        except UNREACHABLE as exc:  # the command is enqueued; its reservation just lapses
            log.warning("idempotency: could not complete in Redis (%r)", exc)

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """A key begun in the database completes in the unit's transaction; one begun in
        Redis after the commit, through :meth:`complete` (which tolerates Redis failing)."""
        if (user_id, key) not in self._in_fallback:
            unit.after_commit(partial(self.complete, user_id, key, status, body))
            return
        await self._fallback.complete_in(unit, user_id, key, status, body)

        async def finished() -> None:  # only once committed: a rollback still abandons here
            self._in_fallback.discard((user_id, key))

        unit.after_commit(finished)

    async def abandon(self, user_id: str, key: str) -> None:
        if (user_id, key) in self._in_fallback:
            self._in_fallback.discard((user_id, key))
            await self._fallback.abandon(user_id, key)
            return
        try:
            await self._primary.abandon(user_id, key)
        except UNREACHABLE as exc:
            log.warning("idempotency: could not abandon in Redis (%r)", exc)

    async def purge_expired(self, now: datetime) -> int:
        return await self._fallback.purge_expired(now)  # Redis expires its keys itself


def build_idempotency_store(
    settings: Settings, database: Database, redis_client: redis.asyncio.Redis | None = None
) -> IdempotencyStore:
    """The store ``IDEMPOTENCY_STORAGE`` names, on the composition root's adapters."""
    ttl = timedelta(hours=settings.idempotency_ttl_hours)
    if settings.idempotency_storage == "redis":
        if redis_client is None:
            raise ValueError("IDEMPOTENCY_STORAGE=redis needs the app's Redis client")
        return FallbackIdempotencyStore(
            RedisIdempotencyStore(redis_client, ttl), DatabaseIdempotencyStore(database, ttl)
        )
    return DatabaseIdempotencyStore(database, ttl)
