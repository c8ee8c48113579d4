"""The outbox relay: PostgreSQL ``outbox`` rows to Kafka, inside the worker or alone as
``escrow-stream outbox-publisher``; and the daily cleanup of expired idempotency keys.

Relaying (:class:`OutboxPublisher`), one batch per transaction:

1. Claim up to ``BATCH_MAX`` due rows, oldest first (``ORDER BY created_at, id LIMIT …
   FOR UPDATE SKIP LOCKED``): another publisher skips locked rows, so two publishers never
   send the same row in normal operation.  A claimed row whose aggregate still has an
   older live row outside this claim (backing off, or locked by another publisher) is
   left alone, so an aggregate's messages never overtake each other.
2. Send the rows with one idempotent ``acks=all`` producer: aggregates concurrently, each
   aggregate's rows one after the other; after a failed send, that aggregate's later rows
   in the batch are not attempted (and not charged an attempt).
3. In the same transaction, which still holds the row locks: sent rows get
   ``published_at``; a failed row gets ``attempts + 1``, ``last_error`` and
   ``next_attempt_at = now + backoff_s(attempts, BACKOFF_BASE_S, BACKOFF_MAX_S)`` (1 s
   doubling, at most 5 minutes: :func:`escrow_stream.retry.backoff_s`); at
   ``ATTEMPTS_MAX`` failures it is dead-lettered (``dead_lettered_at``).  A dead-lettered
   row no longer holds back its aggregate's later rows; :func:`replay` makes it due again.
4. Commit, releasing the locks.  A crash between steps 2 and 4 sends those rows again
   later: harmless, because the command processor applies a commandId once and answers a
   repeat with the recorded outcome (SPEC §3, rule 1).

The publisher runs right after a commit (:meth:`OutboxPublisher.notify`) and otherwise
every ``POLL_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import faust
from aiokafka import AIOKafkaProducer
from mode import Service
from prometheus_client import start_http_server

from escrow_stream.clock import Clock, utc_now
from escrow_stream.config import Settings
from escrow_stream.db.outbox import decode_headers
from escrow_stream.db.pool import Database
from escrow_stream.idempotency import IdempotencyStore
from escrow_stream.kafka import client_kwargs
from escrow_stream.metrics import (
    OUTBOX_DEAD_LETTERS,
    OUTBOX_LAG,
    OUTBOX_PENDING,
    OUTBOX_PUBLISHED,
)
from escrow_stream.retry import backoff_s

log = logging.getLogger(__name__)

BATCH_MAX = 100
POLL_INTERVAL_S = 1.0
ATTEMPTS_MAX = 10
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
#: aiokafka gives up on a message after this long (``request_timeout_ms``) …
SEND_TIMEOUT_S = 10.0
#: … and we stop waiting for its answer a little later.
SEND_WAIT_S = SEND_TIMEOUT_S + 5.0
LAST_ERROR_CHARS_MAX = 1000
#: After an unexpected error the relay loop waits this long before trying again.
ERROR_PAUSE_S = 1.0

#: The daily cleanup of expired idempotency records (UTC), on the leader only.
PURGE_CRONTAB = "17 3 * * *"
#: How long stopping waits for the batch in progress (sends time out well before).
STOP_WAIT_S = 60.0


_CLAIM = """
WITH claimed AS (
    SELECT id, aggregate_id, topic, message_key, payload, headers, attempts, created_at
      FROM outbox
     WHERE published_at IS NULL AND dead_lettered_at IS NULL AND next_attempt_at <= $1
     ORDER BY created_at, id
     LIMIT $2
       FOR UPDATE SKIP LOCKED
)
SELECT c.id, c.aggregate_id, c.topic, c.message_key, c.payload, c.headers, c.attempts
  FROM claimed c
 WHERE NOT EXISTS (
        SELECT 1 FROM outbox o
         WHERE o.aggregate_id = c.aggregate_id
           AND o.published_at IS NULL AND o.dead_lettered_at IS NULL
           AND (o.created_at, o.id) < (c.created_at, c.id)
           AND o.id NOT IN (SELECT id FROM claimed))
 ORDER BY c.created_at, c.id
"""


class OutboxPublisher:
    """Relays outbox rows to Kafka (steps 1-4 of the module docstring).

    Safe to run in several processes at once.  ``clock`` decides which rows are due and
    stamps ``published_at`` / ``next_attempt_at``, so tests can fast-forward the backoff.
    """

    def __init__(self, settings: Settings, database: Database, clock: Clock) -> None:
        self._settings = settings
        self._database = database
        self._clock = clock
        self._wake = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None

    def notify(self) -> None:
        """Wake the publisher now (called after a transaction with outbox rows commits)."""
        self._wake.set()

    async def close(self) -> None:
        """Stop the producer (it is started again on the next batch)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish until ``stopping`` is set; a batch that has begun is always finished."""
        while not stopping.is_set():
            self._wake.clear()
            try:
                sent = await self.publish_batch()
            except Exception:
                log.exception("outbox: batch failed; retrying in %.1f s", ERROR_PAUSE_S)
                await _first_of(stopping, timeout_s=ERROR_PAUSE_S)
                continue
            if sent >= BATCH_MAX:
                continue  # a full batch: more are probably waiting
            await _first_of(stopping, self._wake, timeout_s=POLL_INTERVAL_S)

    async def publish_batch(self) -> int:
        """One batch (steps 1-4); returns how many rows were sent."""
        pool = await self._database.pool()
        now = self._clock()
        failed_any = False
        async with pool.acquire() as conn:
            async with conn.transaction():
                rows = await conn.fetch(_CLAIM, now, BATCH_MAX)
                sent: list[int] = []
                if rows:
                    sent, failed = await self._send(rows)
                    failed_any = bool(failed)
                    await self._mark(conn, sent, failed, now)
            await self._observe(conn, now)
        if sent:
            OUTBOX_PUBLISHED.inc(len(sent))
        if failed_any:
            await self.close()  # start afresh: the producer's state is unknown
        return len(sent)

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

    async def _send(
        self, rows: Sequence[asyncpg.Record]
    ) -> tuple[list[int], list[tuple[asyncpg.Record, str]]]:
        """Step 2: the ids sent, and the rows that failed with their error."""
        by_aggregate: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_aggregate.setdefault(row["aggregate_id"], []).append(row)
        try:
            producer = await self._producer_started()
        except Exception as exc:  # no broker: each aggregate's first row fails this round
            error = f"producer start: {type(exc).__name__}: {exc}"
            return [], [(chain[0], error) for chain in by_aggregate.values()]
        sent: list[int] = []
        failed: list[tuple[asyncpg.Record, str]] = []

        async def send_chain(chain: list[asyncpg.Record]) -> None:
            for row in chain:
                try:
                    await asyncio.wait_for(
                        producer.send_and_wait(
                            row["topic"],
                            value=bytes(row["payload"]),
                            key=row["message_key"].encode("utf-8"),
                            headers=decode_headers(row["headers"]),
                        ),
                        SEND_WAIT_S,
                    )
                except Exception as exc:
                    failed.append((row, f"{type(exc).__name__}: {exc}"))
                    return  # the aggregate's later rows wait for this one
                sent.append(row["id"])

        await asyncio.gather(*(send_chain(chain) for chain in by_aggregate.values()))
        return sent, failed

    async def _mark(
        self,
        conn: asyncpg.Connection,
        sent: list[int],
        failed: list[tuple[asyncpg.Record, str]],
        now: datetime,
    ) -> None:
        """Step 3, under the locks taken in step 1."""
        if sent:
            await conn.execute(
                "UPDATE outbox SET published_at = $2 WHERE id = ANY($1::bigint[])", sent, now
            )
        for row, error in failed:
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
                error[:LAST_ERROR_CHARS_MAX],
                now + timedelta(seconds=backoff_s(attempts, BACKOFF_BASE_S, BACKOFF_MAX_S)),
                dead,
                now,
            )
            if dead:
                OUTBOX_DEAD_LETTERS.inc()
                log.error(
                    "outbox row %s dead-lettered after %d attempts: %s", row["id"], attempts, error
                )
            else:
                log.warning("outbox row %s failed (attempt %d): %s", row["id"], attempts, error)

    async def _observe(self, conn: asyncpg.Connection, now: datetime) -> None:
        pending, oldest = await conn.fetchrow(
            "SELECT count(*), min(created_at) FROM outbox"
            " WHERE published_at IS NULL AND dead_lettered_at IS NULL"
        )
        OUTBOX_PENDING.set(pending)
        OUTBOX_LAG.set(max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0)


async def _first_of(*events: asyncio.Event, timeout_s: float) -> None:
    """Wait until one of ``events`` is set, or ``timeout_s``."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class OutboxRelay(Service):
    """:meth:`OutboxPublisher.run` as a service of the worker.

    1. Started with the app (it needs PostgreSQL and the brokers, not the tables).
    2. On stop: ask the loop to stop, wait (at most ``STOP_WAIT_S``) for the batch in
       progress to be marked, then stop the producer.
    """

    def __init__(self, publisher: OutboxPublisher, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._publisher = publisher
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False

    @Service.task
    async def _relay(self) -> None:
        self._running = True
        try:
            await self._publisher.run(self._stopping)
        finally:
            self._finished.set()

    async def on_stop(self) -> None:
        self._stopping.set()
        if self._running:
            try:
                await asyncio.wait_for(self._finished.wait(), STOP_WAIT_S)
            except TimeoutError:
                log.warning("outbox relay: batch still running after %.0f s", STOP_WAIT_S)
        await self._publisher.close()


def register(
    app: faust.App, publisher: OutboxPublisher, idempotency: IdempotencyStore, clock: Clock
) -> OutboxRelay:
    """Run ``publisher`` with the worker, and purge expired idempotency records daily."""
    relay = OutboxRelay(publisher)
    app.add_dependency(relay)

    @app.crontab(PURGE_CRONTAB, timezone=UTC, on_leader=True)
    async def purge_idempotency_keys() -> None:
        purged = await idempotency.purge_expired(clock())
        log.info("idempotency: purged %d expired record(s)", purged)

    return relay


async def run_standalone(settings: Settings, clock: Clock = utc_now) -> None:
    """The seed's separate outbox-publisher deployment.

    1. Serve the Prometheus metrics on ``METRICS_PORT`` when ``METRICS_ENABLED``.
    2. Relay until SIGTERM or SIGINT.
    3. Finish the batch in progress, stop the producer, close the pool, return (exit 0).
    """
    if settings.metrics_enabled:
        start_http_server(settings.metrics_port, addr=settings.web_host)
    database = Database(settings)
    publisher = OutboxPublisher(settings, database, clock)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("outbox publisher started")
    try:
        await publisher.run(stopping)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await publisher.close()
        await database.close()
    log.info("outbox publisher stopped")
