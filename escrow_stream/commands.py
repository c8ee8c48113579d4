"""Faust app commands for operators: ``faust -A escrow_stream.app escrow-get|escrow-list``.

They read the ``escrows`` table's changelog topic from the beginning to its end, so they
work without a running worker and see exactly what a recovering worker would restore.
"""

from __future__ import annotations

import json
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.cli import argument, option

from escrow_stream.app import app, settings
from escrow_stream.config import Settings
from escrow_stream.kafka import client_kwargs, topic_partitions
from escrow_stream.tables import escrows as escrow_table

READ_BATCH_MAX = 1000
READ_TIMEOUT_MS = 1000


async def read_table_from_changelog(settings: Settings, app_id: str) -> dict[str, dict[str, Any]]:
    """The table's latest value per key, folded from its changelog (tombstones delete)."""
    topic = escrow_table.changelog_topic_name(app_id)
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_kwargs(settings))
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


@app.command(argument("escrow_id"))
async def escrow_get(self: Any, escrow_id: str) -> None:
    """Print one escrow as JSON (from the table's changelog); exit 1 when unknown."""
    state = await read_table_from_changelog(settings, app.conf.id)
    if escrow_id not in state:
        raise self.UsageError(f"escrow {escrow_id} not found in the table")
    self.say(json.dumps(state[escrow_id], indent=2, sort_keys=True))


@app.command(option("--status", "status", default=None, help="Only escrows in this status."))
async def escrow_list(self: Any, status: str | None) -> None:
    """Print the escrows as JSON lines (from the table's changelog)."""
    state = await read_table_from_changelog(settings, app.conf.id)
    for escrow_id in sorted(state):
        value = state[escrow_id]
        if status is None or value.get("status") == status:
            self.say(json.dumps(value, sort_keys=True))
