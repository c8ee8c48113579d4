"""Derived from history (step 5 of :mod:`escrow_stream.db.projection`): ledger lines, the
provider references of the rail rows and the dispute's resolver, from the stored events."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from escrow_stream.db.projection.records import Item


async def insert_ledger(conn: asyncpg.Connection, items: list[Item]) -> None:
    """The ledger lines of each item's snapshot not yet in ``ledger_entries``."""
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


#: ``stripe_escrows.transfer_id`` / ``refund_id``: the providerReference of the newest
#: EscrowReleased / MilestoneReleased, and of the newest EscrowRefunded.
_STRIPE_REFERENCES = """
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
"""
#: ``stablecoin_escrows.transfer_id``: the providerReference of the newest settlement event.
_STABLECOIN_TRANSFERS = """
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
"""
#: ``disputes.resolved_by``: the actor of the newest SettlementRequested with a resolution.
_DISPUTE_RESOLVERS = """
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
"""


async def update_from_history(conn: asyncpg.Connection, escrow_ids: list[str]) -> None:
    """Provider references and the dispute's resolver, from the stored event history."""
    await conn.execute(_STRIPE_REFERENCES, escrow_ids)
    await conn.execute(_STABLECOIN_TRANSFERS, escrow_ids)
    await conn.execute(_DISPUTE_RESOLVERS, escrow_ids)
