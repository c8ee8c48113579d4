"""Current state (step 4 of :mod:`escrow_stream.db.projection`): ``escrows``, keyed by
snapshot version, and the rows derived from the snapshot of an escrow whose row changed:
``milestone_escrows``, ``disputes`` (and the rail rows of :mod:`.rails`)."""

from __future__ import annotations

from typing import Any

import asyncpg

from escrow_stream.db.projection.records import Item, json_text

_UPSERT_ESCROWS = """
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
"""


async def upsert_escrows(conn: asyncpg.Connection, items: list[Item]) -> set[str]:
    """Upsert the newest snapshot of each escrow where it is newer; return the ids changed."""
    items = sorted(items, key=lambda i: i.event.escrow_id)
    rows = await conn.fetch(_UPSERT_ESCROWS, *_escrow_columns(items))
    return {r["id"] for r in rows}


def _escrow_columns(items: list[Item]) -> list[list[Any]]:
    """The parameters $1-$19 of :data:`_UPSERT_ESCROWS`, one array per column."""
    escrows = [i.escrow for i in items]
    return [
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
        [json_text(i.snapshot.get("settlement")) for i in items],
        [json_text(i.snapshot) for i in items],
        [e.created_at for e in escrows],
        [e.updated_at for e in escrows],
        [e.expires_at for e in escrows],
        [e.auto_refund_at for e in escrows],
    ]


async def upsert_milestones(conn: asyncpg.Connection, items: list[Item]) -> None:
    """The ``milestone_escrows`` rows of each item's snapshot."""
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


async def upsert_disputes(conn: asyncpg.Connection, items: list[Item]) -> None:
    """The ``disputes`` row of each item's snapshot that has a dispute."""
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
                json_text(list(dispute.evidence_keys)),
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
