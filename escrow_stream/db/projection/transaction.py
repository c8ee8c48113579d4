"""The mirror's transaction (:meth:`Mirror.apply`): the steps of
:mod:`escrow_stream.db.projection` in order, and the savepoint that keeps one poison event
from wedging the mirror."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from escrow_stream.db.pool import Database
from escrow_stream.db.projection.derived import insert_ledger, update_from_history
from escrow_stream.db.projection.escrows import upsert_disputes, upsert_escrows, upsert_milestones
from escrow_stream.db.projection.history import insert_audit, insert_deliveries, insert_events
from escrow_stream.db.projection.offsets import lock_offsets, store_offsets
from escrow_stream.db.projection.rails import upsert_rails
from escrow_stream.db.projection.records import (
    Item,
    MirrorRecord,
    MirrorResult,
    RecordInvalid,
    parse_record,
)

#: The package's logger (its name is the one the mirror always logged under).
log = logging.getLogger("escrow_stream.db.projection")

DEFAULT_CONSUMER = "postgres-mirror"

#: SQLSTATE classes that mean "PostgreSQL rejects this data", not "PostgreSQL is unwell":
#: data exception, integrity constraint violation, program limit exceeded.
DATA_ERROR_CLASSES = frozenset({"22", "23", "54"})

DELIVERY_EVENTS = frozenset({"EscrowDelivered", "MilestoneDelivered"})


def is_data_error(exc: BaseException) -> bool:
    """True for a PostgreSQL error caused by the data of a statement."""
    sqlstate = getattr(exc, "sqlstate", None)
    return (
        isinstance(exc, asyncpg.PostgresError)
        and isinstance(sqlstate, str)
        and sqlstate[:2] in DATA_ERROR_CLASSES
    )


class Mirror:
    """Applies batches of event records to PostgreSQL; see :mod:`escrow_stream.db.projection`."""

    def __init__(self, database: Database | asyncpg.Pool, consumer: str = DEFAULT_CONSUMER) -> None:
        self._database = database
        self.consumer = consumer

    async def _pool(self) -> asyncpg.Pool:
        if isinstance(self._database, Database):
            return await self._database.pool()
        return self._database

    async def apply(self, records: Sequence[MirrorRecord]) -> MirrorResult:
        """Apply ``records`` (in the order received) in one transaction."""
        result = MirrorResult()
        if not records:
            return result
        pool = await self._pool()
        async with pool.acquire() as conn, conn.transaction():
            positions = await lock_offsets(conn, self.consumer, records)
            items = _parse_batch(records, positions, result)
            if items:
                await self._apply_items(conn, items, result)
            await store_offsets(conn, self.consumer, records)
        return result

    async def _apply_items(
        self, conn: asyncpg.Connection, items: list[Item], result: MirrorResult
    ) -> None:
        try:
            async with conn.transaction():
                applied = await _apply_events(conn, items)
        except asyncpg.PostgresError as exc:
            if not is_data_error(exc):
                raise
            log.warning("mirror: batch rejected by PostgreSQL (%s); applying one by one", exc)
        else:
            result.applied += applied
            result.duplicates += len(items) - applied
            return
        for item in items:
            try:
                async with conn.transaction():
                    applied = await _apply_events(conn, [item])
            except asyncpg.PostgresError as exc:
                if not is_data_error(exc):
                    raise
                result.invalid += 1
                record = item.record
                log.error(
                    "mirror: PostgreSQL rejected event %s of %s (%s[%s]@%s): %s",
                    item.event.event_id,
                    item.event.escrow_id,
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
                continue
            result.applied += applied
            result.duplicates += 1 - applied


def _parse_batch(
    records: Sequence[MirrorRecord],
    positions: dict[tuple[str, int], int],
    result: MirrorResult,
) -> list[Item]:
    """Step 2: the records at or above their partition's stored offset that parse, each eventId
    once; the others are counted in ``result``."""
    items: list[Item] = []
    seen: set[str] = set()
    for record in records:
        if record.offset < positions[(record.topic, record.partition)]:
            result.skipped_by_offset += 1
            continue
        try:
            item = parse_record(record)
        except RecordInvalid as exc:
            result.invalid += 1
            log.warning(
                "mirror: skipping invalid record %s[%s]@%s: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            continue
        if item.event.event_id in seen:
            result.duplicates += 1
            continue
        seen.add(item.event.event_id)
        items.append(item)
    return items


async def _apply_events(conn: asyncpg.Connection, items: list[Item]) -> int:
    """Steps 3-5 of :mod:`escrow_stream.db.projection` for distinct events; returns how many
    were new."""
    items = sorted(items, key=lambda i: (i.event.escrow_id, i.event.version))
    new_ids = await insert_events(conn, items)
    new_items = [i for i in items if i.event.event_id in new_ids]
    if new_items:
        await insert_audit(conn, new_items)
        await insert_deliveries(conn, [i for i in new_items if i.event.type in DELIVERY_EVENTS])

    newest: dict[str, Item] = {}
    for item in items:
        current = newest.get(item.event.escrow_id)
        if current is None or item.escrow.version > current.escrow.version:
            newest[item.event.escrow_id] = item
    changed = await upsert_escrows(conn, list(newest.values()))
    changed_items = [newest[escrow_id] for escrow_id in sorted(changed)]
    if changed_items:
        await upsert_rails(conn, changed_items)
        await upsert_milestones(conn, changed_items)
        await upsert_disputes(conn, changed_items)

    touched = sorted(changed | {i.event.escrow_id for i in new_items})
    if touched:
        await insert_ledger(conn, [newest[escrow_id] for escrow_id in touched])
        await update_from_history(conn, touched)
    return len(new_items)
