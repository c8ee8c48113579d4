"""Offsets (steps 1 and 6 of :mod:`escrow_stream.db.projection`): this consumer's rows of
``consumer_offsets``, locked at the start of the transaction and advanced at its end."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from escrow_stream.db.projection.records import MirrorRecord


async def lock_offsets(
    conn: asyncpg.Connection, consumer: str, records: Iterable[MirrorRecord]
) -> dict[tuple[str, int], int]:
    """Step 1: create and lock this consumer's offset rows of the batch's partitions (in a
    fixed order); return each partition's stored ``next_offset``."""
    partitions = sorted({(r.topic, r.partition) for r in records})
    topics = [t for t, _ in partitions]
    numbers = [p for _, p in partitions]
    await conn.execute(
        """
        INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)
        SELECT $1, u.topic, u.partition, 0
          FROM unnest($2::text[], $3::int[]) AS u(topic, partition)
         ORDER BY u.topic, u.partition
        ON CONFLICT (consumer, topic, partition) DO NOTHING
        """,
        consumer,
        topics,
        numbers,
    )
    rows = await conn.fetch(
        """
        SELECT c.topic, c.partition, c.next_offset
          FROM consumer_offsets c
          JOIN unnest($2::text[], $3::int[]) AS u(topic, partition)
            ON c.topic = u.topic AND c.partition = u.partition
         WHERE c.consumer = $1
         ORDER BY c.topic, c.partition
           FOR UPDATE OF c
        """,
        consumer,
        topics,
        numbers,
    )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}


async def store_offsets(
    conn: asyncpg.Connection, consumer: str, records: Iterable[MirrorRecord]
) -> None:
    """Step 6: advance each partition's ``next_offset`` to ``max(offset) + 1`` of the batch."""
    next_offsets: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        next_offsets[key] = max(next_offsets.get(key, 0), r.offset + 1)
    keys = sorted(next_offsets)
    await conn.execute(
        """
        UPDATE consumer_offsets c
           SET next_offset = GREATEST(c.next_offset, u.next_offset), updated_at = now()
          FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(topic, partition, next_offset)
         WHERE c.consumer = $1 AND c.topic = u.topic AND c.partition = u.partition
           AND c.next_offset < u.next_offset
        """,
        consumer,
        [t for t, _ in keys],
        [p for _, p in keys],
        [next_offsets[k] for k in keys],
    )
