"""The idempotency store in PostgreSQL: table ``command_idempotency``, the default."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from escrow_stream.db.pool import Database
from escrow_stream.db.unit_of_work import UnitOfWork
from escrow_stream.idempotency.protocol import IN_FLIGHT_LEASE_S, Begin, BeginKind, existing

log = logging.getLogger("escrow_stream.idempotency")  # one logger for every store

#: The daily purge deletes at most this many rows per statement (short locks).
PURGE_BATCH_MAX = 10_000


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
        return existing(
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
