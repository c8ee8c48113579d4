"""The PostgreSQL mirror of ``escrow.events.v1`` (SPEC §8): history and current state.

:meth:`Mirror.apply` applies a batch of Kafka records in **one** database transaction:

1. **Offsets.** For every (topic, partition) of the batch the row of this consumer in
   ``consumer_offsets`` is created if missing and locked (``FOR UPDATE``, in a fixed order so
   two workers never deadlock).  Records below the stored ``next_offset`` were applied by an
   earlier transaction whose Kafka commit was lost (crash, rebalance): they are skipped.
2. **Parsing.** Each remaining record is decoded and validated with the domain's
   ``parse_event`` plus what PostgreSQL needs (UUID event and posting ids, no NUL characters,
   amounts within ``bigint``, snapshot of the same escrow).  A record that fails is logged,
   counted as ``invalid`` and skipped; the mirror never stops on bad input.  Within the batch
   an eventId seen before is a duplicate.
3. **History** (keyed by eventId, so a replay is a no-op): ``escrow_events`` is inserted with
   ``ON CONFLICT DO NOTHING``; only the events whose row was new get their ``audit_logs``
   row (from_status = status of the snapshot of version - 1, to_status = the snapshot's
   status) and, for EscrowDelivered / MilestoneDelivered, their ``deliveries`` row.  When an
   event arrives after its successor (never in per-partition order, but possible after a
   manual repair) the successor's missing ``from_status`` is filled in, so the audit log
   converges whatever the arrival order.
4. **Current state** (keyed by snapshot version): per escrow the newest snapshot of the batch
   is upserted into ``escrows`` with ``ON CONFLICT (id) DO UPDATE ... WHERE escrows.version <
   EXCLUDED.version``; only for the escrows whose row this changed are the snapshot-derived
   rows rewritten: ``stripe_escrows`` / ``stablecoin_escrows`` (payment ids, addresses),
   ``milestone_escrows`` and ``disputes``.  An older event therefore never overwrites newer
   state, and ``escrows.snapshot`` is always the newest snapshot seen.
5. **Derived from history** for every escrow the batch touched: ledger postings of the
   newest snapshot not yet in ``ledger_entries`` (a posting's id is the eventId of the event
   that made it; lines are keyed ``(event_id, line_no)`` with 1-based ``line_no``, so each
   posting is mirrored exactly once), the Stripe transfer / refund id and the stablecoin
   transfer id (the providerReference of the newest EscrowReleased / MilestoneReleased /
   EscrowRefunded event in ``escrow_events``), and ``disputes.resolved_by`` (the actor of the
   newest SettlementRequested carrying a resolution).  Computing these from the stored
   history instead of from "the event at hand" makes them independent of arrival order.
6. **Offsets** are advanced to ``max(offset) + 1`` per partition (``GREATEST`` with the
   stored value) for every record of the batch, skipped and invalid ones included.

Steps 3-5 run in a savepoint.  If PostgreSQL rejects the data (SQLSTATE class 22, 23 or 54:
something the validation of step 2 did not foresee) the batch is redone one event per
savepoint and the events PostgreSQL rejects are counted invalid, so one poison event cannot
wedge the mirror.  Any other error (connection lost, PostgreSQL restarting, serialization
failure) rolls back the whole transaction and propagates: nothing was applied, the caller
retries, and the offsets in ``consumer_offsets`` keep the retry exact.

**Guarantee.** Any sequence of an escrow's events, delivered any number of times, in any
batching, converges to the same rows, provided the events of one escrow are first seen in
version order (which one partition per escrowId gives).  Even without that order every table
but the audit log's ``to_status`` of a re-emitted event converges.  Caveat of the offset
check: if the events topic is recreated (offsets restart at 0) or the mirror is rebuilt from
an empty database by resetting the Kafka offsets, delete this consumer's rows from
``consumer_offsets`` first, or the records below the stored offsets are skipped.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from escrow_stream.db.pool import Database
from escrow_stream.domain import Escrow, Event, EventInvalid, parse_event

log = logging.getLogger(__name__)

DEFAULT_CONSUMER = "postgres-mirror"

#: SQLSTATE classes that mean "PostgreSQL rejects this data", not "PostgreSQL is unwell":
#: data exception, integrity constraint violation, program limit exceeded.
DATA_ERROR_CLASSES = frozenset({"22", "23", "54"})

BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
BIGINT_MIN = -(2**63)

DELIVERY_EVENTS = frozenset({"EscrowDelivered", "MilestoneDelivered"})


@dataclass(frozen=True, slots=True)
class MirrorRecord:
    """One record of the events topic as the consumer received it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None


@dataclass(slots=True)
class MirrorResult:
    """What one :meth:`Mirror.apply` did with its records."""

    #: Events whose ``escrow_events`` row was new.
    applied: int = 0
    #: Events already mirrored (same eventId earlier in the batch or in the database).
    duplicates: int = 0
    #: Records below the partition's stored ``next_offset`` (already applied).
    skipped_by_offset: int = 0
    #: Records that are not a valid event (or that PostgreSQL rejected); skipped.
    invalid: int = 0

    @property
    def total(self) -> int:
        return self.applied + self.duplicates + self.skipped_by_offset + self.invalid


@dataclass(frozen=True, slots=True)
class _Item:
    """A record that parsed: the event model and the decoded JSON (for the jsonb columns)."""

    record: MirrorRecord
    event: Event
    raw: Mapping[str, Any]

    @property
    def escrow(self) -> Escrow:
        return self.event.escrow

    @property
    def snapshot(self) -> Mapping[str, Any]:
        snapshot: Mapping[str, Any] = self.raw["escrow"]
        return snapshot


class RecordInvalid(ValueError):
    """A record that cannot be mirrored."""


def is_data_error(exc: BaseException) -> bool:
    """True for a PostgreSQL error caused by the data of a statement."""
    sqlstate = getattr(exc, "sqlstate", None)
    return (
        isinstance(exc, asyncpg.PostgresError)
        and isinstance(sqlstate, str)
        and sqlstate[:2] in DATA_ERROR_CLASSES
    )


def parse_record(record: MirrorRecord) -> _Item:
    """Decode and validate one record; raise :class:`RecordInvalid` with the reason."""
    if record.value is None:
        raise RecordInvalid("no value (tombstone)")
    try:
        raw = json.loads(record.value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordInvalid(f"not JSON: {exc}") from None
    try:
        event = parse_event(raw)
    except EventInvalid as exc:
        raise RecordInvalid(str(exc)) from None
    _check_storable(event, raw)
    return _Item(record=record, event=event, raw=raw)


def _check_storable(event: Event, raw: Mapping[str, Any]) -> None:
    """What PostgreSQL needs beyond the domain's validation."""
    if event.escrow.escrow_id != event.escrow_id:
        raise RecordInvalid("snapshot belongs to another escrow")
    _require_uuid(event.event_id, "eventId")
    for posting in event.escrow.ledger:
        _require_uuid(posting.posting_id, "postingId")
    if _has_unstorable_text(raw):
        raise RecordInvalid("text with a NUL character or a lone surrogate (not storable)")
    if max(event.version, event.escrow.version) > INT_MAX:
        raise RecordInvalid("a version does not fit in integer")
    escrow = event.escrow
    amounts = [
        escrow.amount,
        escrow.funded_amount,
        escrow.released_amount,
        escrow.refunded_amount,
        *(m.amount for m in escrow.milestones),
        *(line.amount for p in escrow.ledger for line in p.lines),
    ]
    if any(not BIGINT_MIN <= a <= BIGINT_MAX for a in amounts):
        raise RecordInvalid("an amount does not fit in bigint")


def _require_uuid(value: str, field: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise RecordInvalid(f"{field} {value!r} is not a UUID") from None


def _has_unstorable_text(value: Any) -> bool:
    """True if a string holds what PostgreSQL text/jsonb cannot: NUL, or invalid UTF-8."""
    if isinstance(value, str):
        if "\x00" in value:
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, Mapping):
        return any(_has_unstorable_text(k) or _has_unstorable_text(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_unstorable_text(v) for v in value)
    return False


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


class Mirror:
    """Applies batches of event records to PostgreSQL; see the module docstring."""

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
            positions = await self._lock_offsets(conn, records)
            items: list[_Item] = []
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
            if items:
                await self._apply_items(conn, items, result)
            await self._store_offsets(conn, records)
        return result

    # -- offsets ---------------------------------------------------------------------------

    async def _lock_offsets(
        self, conn: asyncpg.Connection, records: Iterable[MirrorRecord]
    ) -> dict[tuple[str, int], int]:
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
            self.consumer,
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
            self.consumer,
            topics,
            numbers,
        )
        return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    async def _store_offsets(
        self, conn: asyncpg.Connection, records: Iterable[MirrorRecord]
    ) -> None:
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
            self.consumer,
            [t for t, _ in keys],
            [p for _, p in keys],
            [next_offsets[k] for k in keys],
        )

    # -- events ----------------------------------------------------------------------------

    async def _apply_items(
        self, conn: asyncpg.Connection, items: list[_Item], result: MirrorResult
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


async def _apply_events(conn: asyncpg.Connection, items: list[_Item]) -> int:
    """Steps 3-5 of the module docstring for distinct events; returns how many were new."""
    items = sorted(items, key=lambda i: (i.event.escrow_id, i.event.version))
    new_ids = await _insert_events(conn, items)
    new_items = [i for i in items if i.event.event_id in new_ids]
    if new_items:
        await _insert_audit(conn, new_items)
        await _insert_deliveries(conn, [i for i in new_items if i.event.type in DELIVERY_EVENTS])

    newest: dict[str, _Item] = {}
    for item in items:
        current = newest.get(item.event.escrow_id)
        if current is None or item.escrow.version > current.escrow.version:
            newest[item.event.escrow_id] = item
    changed = await _upsert_escrows(conn, list(newest.values()))
    changed_items = [newest[escrow_id] for escrow_id in sorted(changed)]
    if changed_items:
        await _upsert_rails(conn, changed_items)
        await _upsert_milestones(conn, changed_items)
        await _upsert_disputes(conn, changed_items)

    touched = sorted(changed | {i.event.escrow_id for i in new_items})
    if touched:
        await _insert_ledger(conn, [newest[escrow_id] for escrow_id in touched])
        await _update_from_history(conn, touched)
    return len(new_items)


async def _insert_events(conn: asyncpg.Connection, items: list[_Item]) -> set[str]:
    rows = await conn.fetch(
        """
        INSERT INTO escrow_events (event_id, escrow_id, version, event_type, occurred_at,
                                   causation_id, correlation_id, trace_id, data, snapshot,
                                   kafka_partition, kafka_offset)
        SELECT u.event_id, u.escrow_id, u.version, u.event_type, u.occurred_at,
               u.causation_id, u.correlation_id, u.trace_id, u.data::jsonb, u.snapshot::jsonb,
               u.kafka_partition, u.kafka_offset
          FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::timestamptz[],
                      $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                      $11::int[], $12::bigint[])
               WITH ORDINALITY AS u(event_id, escrow_id, version, event_type, occurred_at,
                                    causation_id, correlation_id, trace_id, data, snapshot,
                                    kafka_partition, kafka_offset, ord)
         ORDER BY u.ord
        -- no conflict target: a known eventId, or another id claiming a stored
        -- (escrow_id, version), is a duplicate either way
        ON CONFLICT DO NOTHING
        RETURNING event_id
        """,
        [uuid.UUID(i.event.event_id) for i in items],
        [i.event.escrow_id for i in items],
        [i.event.version for i in items],
        [i.event.type for i in items],
        [i.event.occurred_at for i in items],
        [i.event.causation_id for i in items],
        [i.event.correlation_id for i in items],
        [i.event.trace_id for i in items],
        [_json(i.raw.get("data", {})) for i in items],
        [_json(i.snapshot) for i in items],
        [i.record.partition for i in items],
        [i.record.offset for i in items],
    )
    return {str(r["event_id"]) for r in rows}


async def _insert_audit(conn: asyncpg.Connection, items: list[_Item]) -> None:
    ids = [uuid.UUID(i.event.event_id) for i in items]
    await conn.execute(
        """
        INSERT INTO audit_logs (event_id, escrow_id, actor_id, actor_role, action,
                                from_status, to_status, created_at)
        SELECT u.event_id, u.escrow_id, u.actor_id, u.actor_role, u.action,
               prev.snapshot ->> 'status', u.to_status, u.created_at
          FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[],
                      $7::text[], $8::timestamptz[])
               WITH ORDINALITY AS u(event_id, escrow_id, version, actor_id, actor_role,
                                    action, to_status, created_at, ord)
          LEFT JOIN escrow_events prev
                 ON prev.escrow_id = u.escrow_id AND prev.version = u.version - 1
         ORDER BY u.ord
        ON CONFLICT (event_id) DO NOTHING
        """,
        ids,
        [i.event.escrow_id for i in items],
        [i.event.version for i in items],
        [i.event.actor.id for i in items],
        [i.event.actor.role.value for i in items],
        [i.event.type for i in items],
        [i.escrow.status.value for i in items],
        [i.event.occurred_at for i in items],
    )
    # An event that arrived after its successor gives the successor its from_status.
    await conn.execute(
        """
        UPDATE audit_logs a
           SET from_status = e.snapshot ->> 'status'
          FROM escrow_events e
          JOIN escrow_events nxt ON nxt.escrow_id = e.escrow_id AND nxt.version = e.version + 1
         WHERE e.event_id = ANY($1::uuid[])
           AND a.event_id = nxt.event_id
           AND a.from_status IS NULL
        """,
        ids,
    )


async def _insert_deliveries(conn: asyncpg.Connection, items: list[_Item]) -> None:
    if not items:
        return
    rows = []
    for item in items:
        data = item.raw.get("data", {})
        rows.append(
            (
                uuid.UUID(item.event.event_id),
                item.event.escrow_id,
                data.get("milestoneId"),
                data.get("note"),
                _json(list(data.get("evidenceKeys") or [])),
                item.event.occurred_at,
            )
        )
    await conn.executemany(
        """
        INSERT INTO deliveries (event_id, escrow_id, milestone_id, note, evidence_keys,
                                delivered_at)
        VALUES ($1, $2, $3, $4, $5::text::jsonb, $6)
        ON CONFLICT (event_id) DO NOTHING
        """,
        rows,
    )


async def _upsert_escrows(conn: asyncpg.Connection, items: list[_Item]) -> set[str]:
    items = sorted(items, key=lambda i: i.event.escrow_id)
    escrows = [i.escrow for i in items]
    rows = await conn.fetch(
        """
        INSERT INTO escrows (id, offer_id, contract_id, buyer_id, seller_id, rail, currency,
                             amount, status, version, funded_amount, released_amount,
                             refunded_amount, settlement, snapshot, created_at, updated_at,
                             expires_at, auto_refund_at, mirrored_at)
        SELECT u.id, u.offer_id, u.contract_id, u.buyer_id, u.seller_id, u.rail, u.currency,
               u.amount, u.status, u.version, u.funded_amount, u.released_amount,
               u.refunded_amount, u.settlement::jsonb, u.snapshot::jsonb, u.created_at,
               u.updated_at, u.expires_at, u.auto_refund_at, now()
          FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                      $7::text[], $8::bigint[], $9::text[], $10::int[], $11::bigint[],
                      $12::bigint[], $13::bigint[], $14::text[], $15::text[],
                      $16::timestamptz[], $17::timestamptz[], $18::timestamptz[],
                      $19::timestamptz[])
               AS u(id, offer_id, contract_id, buyer_id, seller_id, rail, currency, amount,
                    status, version, funded_amount, released_amount, refunded_amount,
                    settlement, snapshot, created_at, updated_at, expires_at, auto_refund_at)
        ON CONFLICT (id) DO UPDATE SET
            offer_id = EXCLUDED.offer_id,
            contract_id = EXCLUDED.contract_id,
            buyer_id = EXCLUDED.buyer_id,
            seller_id = EXCLUDED.seller_id,
            rail = EXCLUDED.rail,
            currency = EXCLUDED.currency,
            amount = EXCLUDED.amount,
            status = EXCLUDED.status,
            version = EXCLUDED.version,
            funded_amount = EXCLUDED.funded_amount,
            released_amount = EXCLUDED.released_amount,
            refunded_amount = EXCLUDED.refunded_amount,
            settlement = EXCLUDED.settlement,
            snapshot = EXCLUDED.snapshot,
            created_at = EXCLUDED.created_at,
            updated_at = EXCLUDED.updated_at,
            expires_at = EXCLUDED.expires_at,
            auto_refund_at = EXCLUDED.auto_refund_at,
            mirrored_at = now()
        WHERE escrows.version < EXCLUDED.version
        RETURNING id
        """,
        [e.escrow_id for e in escrows],
        [e.offer_id for e in escrows],
        [e.contract_id for e in escrows],
        [e.buyer_id for e in escrows],
        [e.seller_id for e in escrows],
        [e.rail.value for e in escrows],
        [e.currency.value for e in escrows],
        [e.amount for e in escrows],
        [e.status.value for e in escrows],
        [e.version for e in escrows],
        [e.funded_amount for e in escrows],
        [e.released_amount for e in escrows],
        [e.refunded_amount for e in escrows],
        [_json(i.snapshot.get("settlement")) for i in items],
        [_json(i.snapshot) for i in items],
        [e.created_at for e in escrows],
        [e.updated_at for e in escrows],
        [e.expires_at for e in escrows],
        [e.auto_refund_at for e in escrows],
    )
    return {r["id"] for r in rows}


async def _upsert_rails(conn: asyncpg.Connection, items: list[_Item]) -> None:
    stripe: list[tuple[Any, ...]] = []
    stablecoin: list[tuple[Any, ...]] = []
    for item in items:
        escrow = item.escrow
        payment = escrow.payment
        payment_id = None
        if payment is not None:
            payment_id = payment.funded_provider_payment_id or payment.provider_payment_id
        if escrow.rail.value == "STRIPE":
            stripe.append((escrow.escrow_id, payment_id, escrow.updated_at))
        else:
            stablecoin.append(
                (
                    escrow.escrow_id,
                    payment_id,
                    payment.deposit_address if payment is not None else None,
                    payment.sender_address if payment is not None else None,
                    escrow.updated_at,
                )
            )
    # A provider id already claimed by another escrow is left out rather than failing the
    # batch on the UNIQUE constraint (it would be a provider-side anomaly, visible in the
    # snapshot).
    if stripe:
        await conn.executemany(
            """
            INSERT INTO stripe_escrows (escrow_id, payment_intent_id, updated_at)
            VALUES ($1, CASE WHEN EXISTS (SELECT 1 FROM stripe_escrows o
                                           WHERE o.payment_intent_id = $2
                                             AND o.escrow_id <> $1)
                             THEN NULL ELSE $2 END, $3)
            ON CONFLICT (escrow_id) DO UPDATE SET
                payment_intent_id = COALESCE(EXCLUDED.payment_intent_id,
                                             stripe_escrows.payment_intent_id),
                updated_at = EXCLUDED.updated_at
            """,
            stripe,
        )
    if stablecoin:
        await conn.executemany(
            """
            INSERT INTO stablecoin_escrows (escrow_id, deposit_id, deposit_address,
                                            sender_address, updated_at)
            VALUES ($1, CASE WHEN EXISTS (SELECT 1 FROM stablecoin_escrows o
                                           WHERE o.deposit_id = $2 AND o.escrow_id <> $1)
                             THEN NULL ELSE $2 END, $3, $4, $5)
            ON CONFLICT (escrow_id) DO UPDATE SET
                deposit_id = COALESCE(EXCLUDED.deposit_id, stablecoin_escrows.deposit_id),
                deposit_address = COALESCE(EXCLUDED.deposit_address,
                                           stablecoin_escrows.deposit_address),
                sender_address = COALESCE(EXCLUDED.sender_address,
                                          stablecoin_escrows.sender_address),
                updated_at = EXCLUDED.updated_at
            """,
            stablecoin,
        )


async def _upsert_milestones(conn: asyncpg.Connection, items: list[_Item]) -> None:
    rows = [
        (
            item.escrow.escrow_id,
            m.milestone_id,
            m.title,
            m.amount,
            m.status.value,
            item.escrow.updated_at,
        )
        for item in items
        for m in item.escrow.milestones
    ]
    if not rows:
        return
    await conn.executemany(
        """
        INSERT INTO milestone_escrows (escrow_id, milestone_id, title, amount, status,
                                       updated_at)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (escrow_id, milestone_id) DO UPDATE SET
            title = EXCLUDED.title,
            amount = EXCLUDED.amount,
            status = EXCLUDED.status,
            updated_at = EXCLUDED.updated_at
        """,
        rows,
    )


async def _upsert_disputes(conn: asyncpg.Connection, items: list[_Item]) -> None:
    rows = []
    for item in items:
        dispute = item.escrow.dispute
        if dispute is None:
            continue
        rows.append(
            (
                item.escrow.escrow_id,
                dispute.raised_by.id,
                dispute.reason,
                _json(list(dispute.evidence_keys)),
                dispute.raised_at,
                dispute.resolution.value if dispute.resolution is not None else None,
                dispute.resolved_at,
            )
        )
    if not rows:
        return
    await conn.executemany(
        """
        INSERT INTO disputes (escrow_id, raised_by, reason, evidence_keys, raised_at,
                              resolution, resolved_at)
        VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7)
        ON CONFLICT (escrow_id) DO UPDATE SET
            raised_by = EXCLUDED.raised_by,
            reason = EXCLUDED.reason,
            evidence_keys = EXCLUDED.evidence_keys,
            raised_at = EXCLUDED.raised_at,
            resolution = EXCLUDED.resolution,
            resolved_at = EXCLUDED.resolved_at
        """,
        rows,
    )


async def _insert_ledger(conn: asyncpg.Connection, items: list[_Item]) -> None:
    event_ids: list[uuid.UUID] = []
    line_nos: list[int] = []
    escrow_ids: list[str] = []
    accounts: list[str] = []
    currencies: list[str] = []
    amounts: list[int] = []
    posted_at: list[datetime] = []
    for item in items:
        for posting in item.escrow.ledger:
            for line_no, line in enumerate(posting.lines, start=1):
                event_ids.append(uuid.UUID(posting.posting_id))
                line_nos.append(line_no)
                escrow_ids.append(item.escrow.escrow_id)
                accounts.append(line.account)
                currencies.append(posting.currency.value)
                amounts.append(line.amount)
                posted_at.append(posting.occurred_at)
    if not event_ids:
        return
    await conn.execute(
        """
        INSERT INTO ledger_entries (event_id, line_no, escrow_id, account, currency, amount,
                                    posted_at)
        SELECT u.event_id, u.line_no, u.escrow_id, u.account, u.currency, u.amount, u.posted_at
          FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                      $7::timestamptz[]) WITH ORDINALITY
               AS u(event_id, line_no, escrow_id, account, currency, amount, posted_at, ord)
         ORDER BY u.ord
        ON CONFLICT (event_id, line_no) DO NOTHING
        """,
        event_ids,
        line_nos,
        escrow_ids,
        accounts,
        currencies,
        amounts,
        posted_at,
    )


async def _update_from_history(conn: asyncpg.Connection, escrow_ids: list[str]) -> None:
    """Provider references and the dispute's resolver, from the stored event history."""
    await conn.execute(
        """
        WITH h AS (
            SELECT escrow_id,
                   (array_agg(data ->> 'providerReference' ORDER BY version DESC)
                       FILTER (WHERE event_type IN ('EscrowReleased', 'MilestoneReleased')))[1]
                       AS transfer_id,
                   (array_agg(data ->> 'providerReference' ORDER BY version DESC)
                       FILTER (WHERE event_type = 'EscrowRefunded'))[1] AS refund_id
              FROM escrow_events
             WHERE escrow_id = ANY($1::text[])
               AND event_type IN ('EscrowReleased', 'MilestoneReleased', 'EscrowRefunded')
             GROUP BY escrow_id
        )
        UPDATE stripe_escrows s
           SET transfer_id = h.transfer_id, refund_id = h.refund_id
          FROM h
         WHERE s.escrow_id = h.escrow_id
           AND (s.transfer_id IS DISTINCT FROM h.transfer_id
                OR s.refund_id IS DISTINCT FROM h.refund_id)
        """,
        escrow_ids,
    )
    await conn.execute(
        """
        WITH h AS (
            SELECT DISTINCT ON (escrow_id) escrow_id, data ->> 'providerReference' AS transfer_id
              FROM escrow_events
             WHERE escrow_id = ANY($1::text[])
               AND event_type IN ('EscrowReleased', 'MilestoneReleased', 'EscrowRefunded')
             ORDER BY escrow_id, version DESC
        )
        UPDATE stablecoin_escrows s
           SET transfer_id = h.transfer_id
          FROM h
         WHERE s.escrow_id = h.escrow_id AND s.transfer_id IS DISTINCT FROM h.transfer_id
        """,
        escrow_ids,
    )
    await conn.execute(
        """
        WITH h AS (
            SELECT DISTINCT ON (e.escrow_id) e.escrow_id, a.actor_id
              FROM escrow_events e
              JOIN audit_logs a ON a.event_id = e.event_id
             WHERE e.escrow_id = ANY($1::text[])
               AND e.event_type = 'SettlementRequested'
               AND e.data ->> 'resolution' IS NOT NULL
             ORDER BY e.escrow_id, e.version DESC
        )
        UPDATE disputes d
           SET resolved_by = h.actor_id
          FROM h
         WHERE d.escrow_id = h.escrow_id AND d.resolved_by IS DISTINCT FROM h.actor_id
        """,
        escrow_ids,
    )
