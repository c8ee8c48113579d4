"""History (step 3 of :mod:`escrow_stream.db.projection`): ``escrow_events``, ``audit_logs``
and ``deliveries``, keyed by eventId."""

from __future__ import annotations

import uuid

import asyncpg

from escrow_stream.db.projection.records import Item, json_text


async def insert_events(conn: asyncpg.Connection, items: list[Item]) -> set[str]:
    """Insert the events (a known eventId or (escrow, version) is a no-op); return the new ids."""
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
        [json_text(i.raw.get("data", {})) for i in items],
        [json_text(i.snapshot) for i in items],
        [i.record.partition for i in items],
        [i.record.offset for i in items],
    )
    return {str(r["event_id"]) for r in rows}


async def insert_audit(conn: asyncpg.Connection, items: list[Item]) -> None:
    """The ``audit_logs`` rows of the new events, and a successor's missing ``from_status``."""
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


async def insert_deliveries(conn: asyncpg.Connection, items: list[Item]) -> None:
    """The ``deliveries`` rows of new EscrowDelivered / MilestoneDelivered events."""
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
                json_text(list(data.get("evidenceKeys") or [])),
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
