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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Scope:
    """What a load reads: this deployment's rows begun since ``since`` or named by a provider
    object (by escrow id, object id, settlement id or unmatched-funds id)."""

    commands_topic: str
    since: datetime
    escrow_ids: list[str]
    object_ids: list[str]
    settlement_ids: list[str]
    funds_ids: list[str]

    @classmethod
    def of(cls, commands_topic: str, since: datetime, named_by: Iterable[ProviderObject]) -> _Scope:
        objects = list(named_by)
        return cls(
            commands_topic=commands_topic,
            since=since,
            escrow_ids=sorted({o.escrow_id for o in objects if o.escrow_id}),
            object_ids=sorted({o.object_id for o in objects}),
            settlement_ids=sorted({o.settlement_id for o in objects if o.settlement_id}),
            funds_ids=sorted({o.unmatched_funds_id for o in objects if o.unmatched_funds_id}),
        )


async def load(
    pool: asyncpg.Pool,
    commands_topic: str,
    since: datetime,
    named_by: Iterable[ProviderObject],
) -> OurRecords:
    """Steps 1-5 of the module docstring, in one consistent read."""
    scope = _Scope.of(commands_topic, since, named_by)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        return OurRecords(
            escrows=await _funded_escrows(conn, scope),
            settlements=await _settlement_effects(conn, scope),
            ledger=await _ledger_settlements(conn, scope),
            deposits=await _deposits(conn, scope),
            unmatched=await _unmatched_funds(conn, scope),
            foreign_escrows=await _foreign_escrows(conn, scope),
            foreign_funds=await _foreign_funds(conn, scope),
        )


async def _funded_escrows(conn: asyncpg.Connection, scope: _Scope) -> tuple[FundedEscrow, ...]:
    """Step 1: the escrows of ours (an ``INSTRUCTIONS`` effect) and the payment that funded them."""
    rows = await conn.fetch(
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
        scope.commands_topic,
        scope.since,
        scope.escrow_ids,
        scope.object_ids,
    )
    return tuple(
        FundedEscrow(
            escrow_id=r["id"],
            provider=_RAIL_PROVIDER.get(r["rail"], r["rail"]),
            created_at=r["created_at"],
            instructions_id=r["instructions_id"],
            funded_payment_id=r["funded_payment_id"],
            funded_amount=int(r["funded_amount"]),
        )
        for r in rows
    )


async def _settlement_effects(
    conn: asyncpg.Connection, scope: _Scope
) -> tuple[SettlementEffect, ...]:
    """Step 2: our ``SETTLEMENT`` effects, with the payout amount of the stored event."""
    rows = await conn.fetch(
        """
        SELECT effect_key, escrow_id, provider, state, provider_object_id, created_at,
               event -> 'escrow' -> 'settlement' ->> 'kind' AS kind,
               (event -> 'escrow' -> 'settlement' ->> 'payoutAmount')::bigint AS amount
          FROM payment_effects
         WHERE commands_topic = $1 AND effect = 'SETTLEMENT'
           AND (created_at >= $2 OR escrow_id = ANY($3::text[])
                OR provider_object_id = ANY($4::text[]) OR effect_key = ANY($5::text[]))
        """,
        scope.commands_topic,
        scope.since,
        scope.escrow_ids,
        scope.object_ids,
        scope.settlement_ids,
    )
    return tuple(
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
        for r in rows
    )


async def _ledger_settlements(
    conn: asyncpg.Connection, scope: _Scope
) -> tuple[LedgerSettlement, ...]:
    """Step 3: the settlements the ledger records, chargeback refunds left out."""
    rows = await conn.fetch(
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
        scope.commands_topic,
        scope.since,
        scope.escrow_ids,
        scope.object_ids,
    )
    return tuple(
        LedgerSettlement(
            event_id=r["event_id"],
            escrow_id=r["escrow_id"],
            event_type=r["event_type"],
            provider=r["provider"] or "",
            reference=r["reference"] or "",
            amount=int(r["amount"] or 0),
            occurred_at=r["occurred_at"],
        )
        for r in rows
    )


async def _deposits(conn: asyncpg.Connection, scope: _Scope) -> tuple[OurDeposit, ...]:
    """Step 4: the ``custodian_deposits`` of our escrows."""
    rows = await conn.fetch(
        """
        SELECT deposit_id, escrow_id, amount, status, received_at
          FROM custodian_deposits
         WHERE escrow_id IN (SELECT escrow_id FROM payment_effects
                              WHERE commands_topic = $1 AND effect = 'INSTRUCTIONS')
           AND (received_at >= $2 OR escrow_id = ANY($3::text[])
                OR deposit_id = ANY($4::text[]))
        """,
        scope.commands_topic,
        scope.since,
        scope.escrow_ids,
        scope.object_ids,
    )
    return tuple(
        OurDeposit(
            deposit_id=r["deposit_id"],
            escrow_id=r["escrow_id"],
            amount=int(r["amount"]),
            status=r["status"],
            received_at=r["received_at"],
        )
        for r in rows
    )


async def _unmatched_funds(conn: asyncpg.Connection, scope: _Scope) -> tuple[UnmatchedFunds, ...]:
    """Step 4: the ``unmatched_funds`` of ours."""
    rows = await conn.fetch(
        """
        SELECT funds_id, provider, provider_object_id, escrow_id, amount, status,
               return_reference, created_at
          FROM unmatched_funds
         WHERE commands_topic = $1
           AND (created_at >= $2 OR escrow_id = ANY($3::text[])
                OR provider_object_id = ANY($4::text[])
                OR return_reference = ANY($4::text[]) OR funds_id = ANY($5::text[]))
        """,
        scope.commands_topic,
        scope.since,
        scope.escrow_ids,
        scope.object_ids,
        scope.funds_ids,
    )
    return tuple(
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
        for r in rows
    )


async def _foreign_escrows(conn: asyncpg.Connection, scope: _Scope) -> frozenset[str]:
    """Step 5: the escrow ids named that the database holds for another deployment."""
    rows = await conn.fetch(
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
        scope.commands_topic,
        scope.escrow_ids,
    )
    return frozenset(r["id"] for r in rows)


async def _foreign_funds(conn: asyncpg.Connection, scope: _Scope) -> frozenset[str]:
    """Step 5: the funds ids named that the database holds for another deployment."""
    rows = await conn.fetch(
        """
        SELECT funds_id FROM unmatched_funds
         WHERE funds_id = ANY($2::text[]) AND commands_topic <> $1
        """,
        scope.commands_topic,
        scope.funds_ids,
    )
    return frozenset(r["funds_id"] for r in rows)
