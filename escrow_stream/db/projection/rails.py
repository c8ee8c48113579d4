"""The rail rows of step 4 of :mod:`escrow_stream.db.projection`: ``stripe_escrows`` and
``stablecoin_escrows`` (payment ids, addresses) from the snapshot of an escrow whose row
changed."""

from __future__ import annotations

from typing import Any

import asyncpg

from escrow_stream.db.projection.records import Item

# A provider id already claimed by another escrow is left out rather than failing the batch on
# the UNIQUE constraint (it would be a provider-side anomaly, visible in the snapshot).
_UPSERT_STRIPE = """
INSERT INTO stripe_escrows (escrow_id, payment_intent_id, updated_at)
VALUES ($1, CASE WHEN EXISTS (SELECT 1 FROM stripe_escrows o
                               WHERE o.payment_intent_id = $2
                                 AND o.escrow_id <> $1)
                 THEN NULL ELSE $2 END, $3)
ON CONFLICT (escrow_id) DO UPDATE SET
    payment_intent_id = COALESCE(EXCLUDED.payment_intent_id,
                                 stripe_escrows.payment_intent_id),
    updated_at = EXCLUDED.updated_at
"""
_UPSERT_STABLECOIN = """
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
"""


async def upsert_rails(conn: asyncpg.Connection, items: list[Item]) -> None:
    """Upsert the ``stripe_escrows`` / ``stablecoin_escrows`` row of each item's escrow."""
    stripe, stablecoin = _rail_rows(items)
    if stripe:
        await conn.executemany(_UPSERT_STRIPE, stripe)
    if stablecoin:
        await conn.executemany(_UPSERT_STABLECOIN, stablecoin)


def _rail_rows(items: list[Item]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The parameter rows of :data:`_UPSERT_STRIPE` and of :data:`_UPSERT_STABLECOIN`."""
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
    return stripe, stablecoin
