"""The transactional outbox (SPEC §4): accepted commands wait in PostgreSQL until Kafka has them.

Writing (the gateway and the webhooks): :func:`enqueue` inserts the message inside the
caller's transaction, next to the idempotency record; nothing is sent before the commit.

Relaying (:class:`OutboxPublisher`), one batch at a time:

1. In one transaction claim up to ``BATCH_MAX`` due rows, oldest first
   (``ORDER BY created_at, id ... FOR UPDATE SKIP LOCKED``): another publisher skips them,
   so two publishers never send the same row in normal operation.
2. Send them in order with an idempotent, ``acks=all`` producer.  Once a row of an
   aggregate fails, that aggregate's later rows in the batch are not sent (per-escrow order).
3. Mark sent rows ``published_at``; failed rows get ``attempts + 1``, ``last_error`` and
   ``next_attempt_at = now + min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempts)``; after
   ``ATTEMPTS_MAX`` failures a row is dead-lettered (``dead_lettered_at``).
4. Commit, releasing the locks.  A crash between step 2 and 4 sends those rows again on the
   next run: harmless, as the command processor answers a repeated commandId with its
   recorded outcome.

The publisher runs after every commit (:meth:`notify`) and polls every ``POLL_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge

from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.db.pool import Database
from escrow_stream.kafka import client_kwargs

log = logging.getLogger(__name__)

BATCH_MAX = 100
POLL_INTERVAL_S = 1.0
ATTEMPTS_MAX = 10
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 300.0
SEND_TIMEOUT_S = 10.0

OUTBOX_PUBLISHED = Counter("escrow_outbox_published_total", "Outbox rows sent to Kafka.")
OUTBOX_DEAD_LETTERS = Counter(
    "escrow_outbox_dead_letters_total", f"Outbox rows given up after {ATTEMPTS_MAX} failures."
)
OUTBOX_PENDING = Gauge("escrow_outbox_pending", "Unpublished, live outbox rows at the last poll.")

Headers = Sequence[tuple[str, bytes]]


async def enqueue(
    conn: asyncpg.Connection,
    topic: str,
    key: str,
    payload: bytes,
    headers: Headers,
    aggregate_id: str,
) -> int:
    """Add a message to the outbox inside the caller's transaction; returns its row id."""
    stored_headers = {name: value.decode("utf-8", "surrogateescape") for name, value in headers}
    row_id: int = await conn.fetchval(
        """
        INSERT INTO outbox (aggregate_id, topic, message_key, payload, headers)
        VALUES ($1, $2, $3, $4, $5) RETURNING id
        """,
        aggregate_id,
        topic,
        key,
        payload,
        stored_headers,  # the pool's jsonb codec encodes it
    )
    return row_id


def backoff_s(attempts: int) -> float:
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempts))


class OutboxPublisher:
    """Relays outbox rows to Kafka; safe to run in several processes at once."""

    def __init__(self, settings: Settings, database: Database, clock: Clock) -> None:
        self._settings = settings
        self._database = database
        self._clock = clock
        self._wake = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None

    def notify(self) -> None:
        """Wake the publisher now (called after a transaction with outbox rows commits)."""
        self._wake.set()

    async def _producer_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                acks="all",
                enable_idempotence=True,
                request_timeout_ms=int(SEND_TIMEOUT_S * 1000),
                **client_kwargs(self._settings),
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish until ``stopping`` is set; the current batch is always finished."""
        while not stopping.is_set():
            try:
                sent = await self.publish_batch()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("outbox: database unavailable, retrying: %s", exc)
                sent = 0
            if sent >= BATCH_MAX:
                continue  # more may be waiting
            self._wake.clear()
            waiter = asyncio.create_task(self._wake.wait())
            stopper = asyncio.create_task(stopping.wait())
            await asyncio.wait(
                {waiter, stopper}, timeout=POLL_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            stopper.cancel()

    async def publish_batch(self) -> int:
        """Steps 1-4 of the module docstring; returns how many rows were sent."""
        pool = await self._database.pool()
        now = self._clock()
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """
                SELECT id, aggregate_id, topic, message_key, payload, headers, attempts
                  FROM outbox
                 WHERE published_at IS NULL AND dead_lettered_at IS NULL
                   AND next_attempt_at <= $1
                 ORDER BY created_at, id
                 LIMIT $2
                   FOR UPDATE SKIP LOCKED
                """,
                now,
                BATCH_MAX,
            )
            OUTBOX_PENDING.set(len(rows))
            if not rows:
                return 0
            sent, failed = await self._send(rows)
            if sent:
                await conn.execute(
                    "UPDATE outbox SET published_at = $2 WHERE id = ANY($1::bigint[])", sent, now
                )
                OUTBOX_PUBLISHED.inc(len(sent))
            for row, error in failed:
                await self._record_failure(conn, row, error, now)
            return len(sent)

    async def _send(
        self, rows: Sequence[asyncpg.Record]
    ) -> tuple[list[int], list[tuple[asyncpg.Record, str]]]:
        sent: list[int] = []
        failed: list[tuple[asyncpg.Record, str]] = []
        blocked: set[str] = set()
        try:
            producer = await self._producer_started()
        except Exception as exc:  # broker unreachable: every row fails this round
            await self.close()
            return [], [(row, f"producer: {exc}") for row in rows]
        for row in rows:
            if row["aggregate_id"] in blocked:
                failed.append((row, "an earlier message of this aggregate failed"))
                continue
            headers = [(k, v.encode("utf-8", "surrogateescape")) for k, v in _headers(row)]
            try:
                await asyncio.wait_for(
                    producer.send_and_wait(
                        row["topic"],
                        value=bytes(row["payload"]),
                        key=row["message_key"].encode(),
                        headers=headers,
                    ),
                    SEND_TIMEOUT_S,
                )
            except Exception as exc:
                blocked.add(row["aggregate_id"])
                failed.append((row, f"{type(exc).__name__}: {exc}"))
                continue
            sent.append(row["id"])
        return sent, failed

    async def _record_failure(
        self, conn: asyncpg.Connection, row: asyncpg.Record, error: str, now: datetime
    ) -> None:
        attempts = row["attempts"] + 1
        dead = attempts >= ATTEMPTS_MAX
        await conn.execute(
            """
            UPDATE outbox SET attempts = $2, last_error = $3, next_attempt_at = $4,
                   dead_lettered_at = CASE WHEN $5::boolean THEN $6::timestamptz END
             WHERE id = $1
            """,
            row["id"],
            attempts,
            error[:1000],
            now + timedelta(seconds=backoff_s(attempts)),
            dead,
            now,
        )
        if dead:
            OUTBOX_DEAD_LETTERS.inc()
            log.error(
                "outbox row %s dead-lettered after %d attempts: %s", row["id"], attempts, error
            )


def _headers(row: asyncpg.Record) -> list[tuple[str, str]]:
    stored: Any = row["headers"]
    if isinstance(stored, str):
        stored = json.loads(stored)
    return list(stored.items())


async def replay(
    pool: asyncpg.Pool, aggregate_ids: Sequence[str] | None, since: datetime | None
) -> int:
    """The seed's "Outbox Replay": make published or dead-lettered rows due again."""
    status = await pool.execute(
        """
        UPDATE outbox
           SET published_at = NULL, dead_lettered_at = NULL, attempts = 0,
               next_attempt_at = now(), last_error = NULL
         WHERE (published_at IS NOT NULL OR dead_lettered_at IS NOT NULL)
           AND ($1::text[] IS NULL OR aggregate_id = ANY($1::text[]))
           AND ($2::timestamptz IS NULL OR created_at >= $2)
        """,
        list(aggregate_ids) if aggregate_ids is not None else None,
        since,
    )
    return int(status.split()[-1])
