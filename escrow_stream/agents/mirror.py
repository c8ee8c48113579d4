"""The PostgreSQL mirror agent: ``escrow.events.v1`` in, ``db.projection.Mirror`` out.

Per batch (SPEC §8; the transaction itself is described in :mod:`escrow_stream.db.projection`):

1. Take up to ``BATCH_MAX`` events, or what arrived within ``BATCH_WITHIN_S`` seconds
   (``Stream.take_events``).
2. Hold every message of the batch (one extra reference each), so that Faust cannot treat
   it as processed before the database has it: ``take_events`` acks the batch in a
   ``finally`` block, which also runs when the agent body raises or is cancelled.
3. Apply the batch with :meth:`Mirror.apply`: one transaction that also records the next
   offset per partition in ``consumer_offsets``.
4. On an error (PostgreSQL down or restarting, connection lost), retry with exponential
   backoff (``RETRY_INITIAL_S`` doubling up to ``RETRY_MAX_S``), logging every attempt, for
   as long as the worker is consuming normally: **no retry limit**.  The mirror is a
   projection whose only correct reaction to an unavailable database is to wait; raising
   instead would restart the actor *after* the failed batch (Faust keeps its in-memory
   position) and the batch would only come back after a restart or rebalance.  Bad *data*
   never reaches this loop: the mirror counts and skips invalid events itself.
5. Exception: when the worker stops or a rebalance begins (Faust stops the consumer's flow
   and waits for in-flight messages), a batch that still fails is **abandoned without being
   acknowledged**: its messages are marked done for Faust's in-flight tracking but their
   offsets are never handed to the consumer's commit, so the committed offset stays before
   the batch and the batch is consumed again after the rebalance (Faust seeks every
   partition to its committed offset) or the next start.  Without this, shutdown and
   rebalances would hang for as long as PostgreSQL is down.
6. After the commit, release the extra references (ack): the offsets become committable.
   If the process dies between the database commit and the Kafka commit, the records come
   back and step 3 skips them by their offsets (and would dedupe them by eventId anyway).
7. Count the outcome in ``escrow_mirror_events_total{result}`` (applied, duplicate,
   skipped_offset, invalid).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import faust
from faust.types import EventT

from escrow_stream.db.pool import Database
from escrow_stream.db.projection import DEFAULT_CONSUMER, Mirror, MirrorRecord, MirrorResult
from escrow_stream.metrics import MIRROR_EVENTS
from escrow_stream.retry import delays

log = logging.getLogger(__name__)

AGENT_NAME = "postgres-mirror"
BATCH_MAX = 200
BATCH_WITHIN_S = 0.2
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
#: How often a backoff sleep checks whether the worker is still consuming.
RETRY_POLL_S = 0.5

Sleep = Callable[[float], Awaitable[None]]


def register(app: faust.App, events_topic: faust.TopicT, database: Database) -> None:
    """Register the ``postgres-mirror`` agent on ``events_topic`` (raw bytes values)."""
    mirror = Mirror(database, consumer=DEFAULT_CONSUMER)

    def consuming() -> bool:
        flowing = getattr(app.consumer, "flow_active", True)
        return bool(flowing) and not app.should_stop and not app.rebalancing

    @app.agent(events_topic, name=AGENT_NAME)
    async def postgres_mirror(stream: faust.StreamT[bytes]) -> None:
        # take_events is defined on the concrete Stream, not on the StreamT interface.
        batches = cast(faust.Stream[bytes], stream).take_events(BATCH_MAX, BATCH_WITHIN_S)
        async for batch in batches:
            await mirror_batch(mirror, batch, consuming)


def records_of(events: Sequence[EventT[bytes]]) -> list[MirrorRecord]:
    return [
        MirrorRecord(
            topic=e.message.topic,
            partition=e.message.partition,
            offset=e.message.offset,
            value=e.message.value,
        )
        for e in events
    ]


async def mirror_batch(
    mirror: Mirror,
    events: Sequence[EventT[bytes]],
    consuming: Callable[[], bool],
    sleep: Sleep = asyncio.sleep,
) -> MirrorResult | None:
    """Steps 2-7 of the module docstring for one batch; None if it was abandoned."""
    for event in events:
        event.message.incref()
    result = await apply_with_retry(mirror, records_of(events), consuming, sleep)
    if result is None:
        for event in events:
            # Done for Faust's in-flight tracking (so shutdown and rebalances do not wait
            # for it), but never passed to Consumer.ack: the offset is not committed.
            event.message.acked = True
        return None
    for event in events:
        event.ack()
    count(result)
    return result


async def apply_with_retry(
    mirror: Mirror,
    records: list[MirrorRecord],
    consuming: Callable[[], bool],
    sleep: Sleep = asyncio.sleep,
) -> MirrorResult | None:
    """:meth:`Mirror.apply`, retried with capped backoff while ``consuming()``; else None."""
    waits = delays(RETRY_INITIAL_S, RETRY_MAX_S)
    attempt = 1
    while True:
        try:
            return await mirror.apply(records)
        except Exception as exc:
            first, last = records[0], records[-1]
            where = (
                f"{len(records)} records ({first.topic}[{first.partition}]@{first.offset}.."
                f"{last.topic}[{last.partition}]@{last.offset})"
            )
            if not consuming():
                log.warning(
                    "mirror: abandoning %s after %d attempts (%r): the worker is stopping or "
                    "rebalancing; they stay uncommitted and will be consumed again",
                    where,
                    attempt,
                    exc,
                )
                return None
            delay = next(waits)
            log.error(
                "mirror: attempt %d to apply %s failed: %r; retrying in %.1fs",
                attempt,
                where,
                exc,
                delay,
                exc_info=attempt == 1,
            )
        waited = 0.0
        while waited < delay and consuming():
            step = min(RETRY_POLL_S, delay - waited)
            await sleep(step)
            waited += step
        attempt += 1


def count(result: MirrorResult) -> None:
    for label, n in (
        ("applied", result.applied),
        ("duplicate", result.duplicates),
        ("skipped_offset", result.skipped_by_offset),
        ("invalid", result.invalid),
    ):
        if n:
            MIRROR_EVENTS.labels(label).inc(n)
