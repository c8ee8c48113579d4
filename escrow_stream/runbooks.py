"""Operator runbooks as code: consumer-offset reset (seed: "Kafka Offset Reset").

Resetting the processor's offsets on ``escrow-commands`` makes it read commands again.  That
is safe because of SPEC §3 rule 1: each escrow remembers the commandIds it applied and
re-emits their recorded events (same eventIds) instead of applying them twice, and every
consumer of the events dedupes by eventId.  Steps:

1. Stop every worker of the group (the broker refuses commits from outside a live group,
   and a live worker would overwrite the reset with its own commits).
2. ``escrow-stream offsets reset --to-datetime 2025-01-02T10:00:00Z`` prints the plan:
   current committed offset and the new one, per partition.
3. Add ``--execute`` to commit the new offsets; start the workers again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from escrow_stream.config import Settings
from escrow_stream.kafka import client_kwargs, topic_partitions
from escrow_stream.tables import escrows as escrow_table


class GroupActive(Exception):
    """The consumer group still has members; stop the workers first."""


@dataclass(frozen=True)
class OffsetChange:
    partition: int
    current: int | None
    new: int


async def active_members(settings: Settings, group_id: str) -> int:
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group_id])
    finally:
        await admin.close()
    total = 0
    for response in described:
        for group in response.groups:
            # (error_code, group_id, state, protocol_type, protocol, members, ...)
            total += len(group[5])
    return total


async def plan_reset(
    settings: Settings, group_id: str, topic: str, to: datetime | None
) -> list[OffsetChange]:
    """New offsets: the first record at or after ``to``, or the earliest with ``to=None``."""
    consumer = AIOKafkaConsumer(
        group_id=group_id, enable_auto_commit=False, **client_kwargs(settings)
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
        if not tps:
            raise ValueError(f"topic {topic} does not exist")
        ends = await consumer.end_offsets(tps)
        if to is None:
            targets = await consumer.beginning_offsets(tps)
        else:
            stamp_ms = int(to.timestamp() * 1000)
            found = await consumer.offsets_for_times({tp: stamp_ms for tp in tps})
            targets = {tp: (found[tp].offset if found[tp] is not None else ends[tp]) for tp in tps}
        changes = []
        for tp in tps:
            committed = await consumer.committed(tp)
            changes.append(OffsetChange(tp.partition, committed, targets[tp]))
        return changes
    finally:
        await consumer.stop()


async def execute_reset(
    settings: Settings, group_id: str, topic: str, changes: list[OffsetChange]
) -> None:
    if await active_members(settings, group_id):
        raise GroupActive(f"group {group_id} has active members: stop every worker first")
    consumer = AIOKafkaConsumer(
        group_id=group_id, enable_auto_commit=False, **client_kwargs(settings)
    )
    await consumer.start()
    try:
        offsets = {
            TopicPartition(topic, c.partition): OffsetAndMetadata(c.new, "offset reset")
            for c in changes
        }
        consumer.assign(list(offsets))  # commit() needs the partitions assigned
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


READ_BATCH_MAX = 1000
READ_TIMEOUT_MS = 1000


async def read_table_from_changelog(settings: Settings, app_id: str) -> dict[str, dict[str, Any]]:
    """The table's latest value per key, folded from its changelog (tombstones delete);
    committed records only: under exactly_once an aborted transaction's writes are not
    the table's."""
    topic = escrow_table.changelog_topic_name(app_id)
    consumer = AIOKafkaConsumer(
        enable_auto_commit=False, isolation_level="read_committed", **client_kwargs(settings)
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        state: dict[str, dict[str, Any]] = {}
        remaining = {tp for tp in tps if end[tp] > 0}
        while remaining:
            batches = await consumer.getmany(
                *remaining, timeout_ms=READ_TIMEOUT_MS, max_records=READ_BATCH_MAX
            )
            for records in batches.values():
                for record in records:
                    key = json.loads(record.key) if record.key is not None else ""
                    if record.value is None:
                        state.pop(key, None)
                    else:
                        state[key] = json.loads(record.value)
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
        return state
    finally:
        await consumer.stop()
