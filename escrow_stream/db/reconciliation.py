"""Our side of the provider reconciliation, read from PostgreSQL (``domain/reconcile.py``).

One repeatable-read transaction reads, for this deployment (``commands_topic``):

1. escrows with an ``INSTRUCTIONS`` payment effect of ours (an escrow is this deployment's
   when its payments agent asked a provider for its payment instructions): the PaymentIntent
   or deposit address, and the funding payment of the snapshot with ``funded_amount``;
2. its ``SETTLEMENT`` effects (key = settlement id, payout amount from the stored event);
3. the ledger's settlements: EscrowReleased / MilestoneReleased / EscrowRefunded in
   ``escrow_events`` (providerReference, payoutAmount of a release, amount of a refund), but
   an EscrowRefunded with reason CHARGEBACK: the card network refunded, no object of ours;
4. ``custodian_deposits`` of those escrows; ``unmatched_funds`` of ours;
5. the escrow and funds ids among those the provider objects name that the database holds
   for another deployment (skipped by the comparison).

Rows are read when they began at or after ``since`` or when a provider object names them
(its escrow id, object id or unmatched-funds id), so the look-up is bounded by the window
and by what the providers listed, never by the whole history.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import asyncpg

from escrow_stream.domain.reconcile import (
    FundedEscrow,
    LedgerSettlement,
    OurDeposit,
    OurRecords,
    ProviderObject,
    SettlementEffect,
    UnmatchedFunds,
)

_RAIL_PROVIDER = {"STRIPE": "stripe", "USDC_BASE": "custodian"}


async def load(
    pool: asyncpg.Pool,
    commands_topic: str,
    since: datetime,
    named_by: Iterable[ProviderObject],
) -> OurRecords:
    """Steps 1-5 of the module docstring, in one consistent read."""
    objects = list(named_by)
    escrow_ids = sorted({o.escrow_id for o in objects if o.escrow_id})
    object_ids = sorted({o.object_id for o in objects})
    settlement_ids = sorted({o.settlement_id for o in objects if o.settlement_id})
    funds_ids = sorted({o.unmatched_funds_id for o in objects if o.unmatched_funds_id})
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        escrows = await conn.fetch(
            """
            SELECT e.id, e.rail, e.created_at, e.funded_amount,
                   e.snapshot -> 'payment' ->> 'fundedProviderPaymentId' AS funded_payment_id,
                   pe.provider_object_id AS instructions_id
              FROM payment_effects pe
              JOIN escrows e ON e.id = pe.escrow_id
             WHERE pe.commands_topic = $1 AND pe.effect = 'INSTRUCTIONS'
               AND (e.created_at >= $2 OR e.id = ANY($3::text[])
                    OR e.snapshot -> 'payment' ->> 'fundedProviderPaymentId' = ANY($4::text[])
                    OR pe.provider_object_id = ANY($4::text[]))
            """,
            commands_topic,
            since,
            escrow_ids,
            object_ids,
        )
        settlements = await conn.fetch(
            """
            SELECT effect_key, escrow_id, provider, state, provider_object_id, created_at,
                   event -> 'escrow' -> 'settlement' ->> 'kind' AS kind,
                   (event -> 'escrow' -> 'settlement' ->> 'payoutAmount')::bigint AS amount
              FROM payment_effects
             WHERE commands_topic = $1 AND effect = 'SETTLEMENT'
               AND (created_at >= $2 OR escrow_id = ANY($3::text[])
                    OR provider_object_id = ANY($4::text[]) OR effect_key = ANY($5::text[]))
            """,
            commands_topic,
            since,
            escrow_ids,
            object_ids,
            settlement_ids,
        )
        ledger = await conn.fetch(
            """
            SELECT ev.event_id::text AS event_id, ev.escrow_id, ev.event_type, ev.occurred_at,
                   ev.data ->> 'provider' AS provider,
                   ev.data ->> 'providerReference' AS reference,
                   (CASE WHEN ev.event_type = 'EscrowRefunded' THEN ev.data ->> 'amount'
                         ELSE ev.data ->> 'payoutAmount' END)::bigint AS amount
              FROM escrow_events ev
             WHERE ev.event_type IN ('EscrowReleased', 'MilestoneReleased', 'EscrowRefunded')
               -- a lost chargeback: the card network refunded (reference = the dispute id)
               AND COALESCE(ev.data ->> 'reason', '') <> 'CHARGEBACK'
               AND ev.escrow_id IN (SELECT escrow_id FROM payment_effects
                                     WHERE commands_topic = $1 AND effect = 'INSTRUCTIONS')
               AND (ev.occurred_at >= $2 OR ev.escrow_id = ANY($3::text[])
                    OR ev.data ->> 'providerReference' = ANY($4::text[]))
            """,
            commands_topic,
            since,
            escrow_ids,
            object_ids,
        )
        deposits = await conn.fetch(
            """
            SELECT deposit_id, escrow_id, amount, status, received_at
              FROM custodian_deposits
             WHERE escrow_id IN (SELECT escrow_id FROM payment_effects
                                  WHERE commands_topic = $1 AND effect = 'INSTRUCTIONS')
               AND (received_at >= $2 OR escrow_id = ANY($3::text[])
                    OR deposit_id = ANY($4::text[]))
            """,
            commands_topic,
            since,
            escrow_ids,
            object_ids,
        )
        unmatched = await conn.fetch(
            """
            SELECT funds_id, provider, provider_object_id, escrow_id, amount, status,
                   return_reference, created_at
              FROM unmatched_funds
             WHERE commands_topic = $1
               AND (created_at >= $2 OR escrow_id = ANY($3::text[])
                    OR provider_object_id = ANY($4::text[])
                    OR return_reference = ANY($4::text[]) OR funds_id = ANY($5::text[]))
            """,
            commands_topic,
            since,
            escrow_ids,
            object_ids,
            funds_ids,
        )
        foreign_escrows = await conn.fetch(
            """
            SELECT k.id FROM (
                   SELECT id FROM escrows WHERE id = ANY($2::text[])
                   UNION SELECT escrow_id FROM payment_effects WHERE escrow_id = ANY($2::text[])
                   UNION SELECT escrow_id FROM unmatched_funds WHERE escrow_id = ANY($2::text[])
                   ) k
             WHERE NOT EXISTS (SELECT 1 FROM payment_effects p
                                WHERE p.escrow_id = k.id AND p.commands_topic = $1)
               AND NOT EXISTS (SELECT 1 FROM unmatched_funds u
                                WHERE u.escrow_id = k.id AND u.commands_topic = $1)
            """,
            commands_topic,
            escrow_ids,
        )
        foreign_funds = await conn.fetch(
            """
            SELECT funds_id FROM unmatched_funds
             WHERE funds_id = ANY($2::text[]) AND commands_topic <> $1
            """,
            commands_topic,
            funds_ids,
        )
    return OurRecords(
        escrows=tuple(
            FundedEscrow(
                escrow_id=r["id"],
                provider=_RAIL_PROVIDER.get(r["rail"], r["rail"]),
                created_at=r["created_at"],
                instructions_id=r["instructions_id"],
                funded_payment_id=r["funded_payment_id"],
                funded_amount=int(r["funded_amount"]),
            )
            for r in escrows
        ),
        settlements=tuple(
            SettlementEffect(
                key=r["effect_key"],
                escrow_id=r["escrow_id"],
                provider=r["provider"],
                kind=r["kind"] or "",
                state=r["state"],
                object_id=r["provider_object_id"],
                amount=int(r["amount"] or 0),
                created_at=r["created_at"],
            )
            for r in settlements
        ),
        ledger=tuple(
            LedgerSettlement(
                event_id=r["event_id"],
                escrow_id=r["escrow_id"],
                event_type=r["event_type"],
                provider=r["provider"] or "",
                reference=r["reference"] or "",
                amount=int(r["amount"] or 0),
                occurred_at=r["occurred_at"],
            )
            for r in ledger
        ),
        deposits=tuple(
            OurDeposit(
                deposit_id=r["deposit_id"],
                escrow_id=r["escrow_id"],
                amount=int(r["amount"]),
                status=r["status"],
                received_at=r["received_at"],
            )
            for r in deposits
        ),
        unmatched=tuple(
            UnmatchedFunds(
                funds_id=r["funds_id"],
                provider=r["provider"],
                object_id=r["provider_object_id"],
                escrow_id=r["escrow_id"],
                amount=int(r["amount"]),
                status=r["status"],
                return_reference=r["return_reference"],
                created_at=r["created_at"],
            )
            for r in unmatched
        ),
        foreign_escrows=frozenset(r["id"] for r in foreign_escrows),
        foreign_funds=frozenset(r["funds_id"] for r in foreign_funds),
    )
