"""Unmatched funds (``unmatched_funds``, SPEC §10): money that arrived and that no escrow took.

One row per provider object (a Stripe PaymentIntent, a custodian deposit), recorded once
(``ON CONFLICT DO NOTHING``), whoever reports it first.  Its status:

* ``RETURNING`` — to be sent back: due at ``next_attempt_at`` (claimed by one worker at a
  time, ``FOR UPDATE SKIP LOCKED``, leased by pushing ``next_attempt_at`` past the call); once
  the provider took the return, ``return_reference`` names it and the row waits for the
  provider's confirmation (Stripe: due again to read the Refund's status; the custodian:
  ``next_attempt_at`` NULL until its ``transfer.completed``);
* ``RETURNED`` — the provider confirmed the return (terminal);
* ``FROZEN`` — a flagged sender's deposit, never moved, listed for compliance (terminal here);
* ``NEEDS_REVIEW`` — the provider refused the return, or the money names no escrow this
  deployment knows: a person decides (``escrow-stream funds retry`` sends it back).

Rows belong to the deployment that recorded them (``commands_topic``), as payment effects do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from escrow_stream.db.leases import WorkTable, lease_due
from escrow_stream.domain import fitted
from escrow_stream.metrics import UNMATCHED_FUNDS

#: Due: to be sent back, or a Stripe refund to read again (NULL: waiting for a webhook).
WORK = WorkTable("unmatched_funds", "funds_id", "status = 'RETURNING'")


class FundsStatus(StrEnum):
    RETURNING = "RETURNING"
    RETURNED = "RETURNED"
    FROZEN = "FROZEN"
    NEEDS_REVIEW = "NEEDS_REVIEW"


#: Why money is unmatched, besides the escrow's own rejection code (AMOUNT_MISMATCH, ...).
SENDER_FLAGGED = "SENDER_FLAGGED"


def funds_id_for(provider: str, provider_object_id: str) -> str:
    return f"{provider}:{provider_object_id}"


RETURN_PREFIX = "unmatched:"


def return_key(funds_id: str) -> str:
    """The provider idempotency key / custodian reference of a return (never time-based)."""
    return f"{RETURN_PREFIX}{funds_id}"


def is_return_key(reference: str) -> bool:
    return reference.startswith(RETURN_PREFIX)


@dataclass(frozen=True)
class UnmatchedFunds:
    """One row, as the return runner and the operators' views use it."""

    funds_id: str
    provider: str
    provider_object_id: str
    escrow_id: str | None
    commands_topic: str
    amount: int
    currency: str
    reason: str
    status: FundsStatus
    detail: str | None = None
    sender_address: str | None = None
    return_reference: str | None = None
    attempts: int = 0
    last_error: str | None = None

    @classmethod
    def of(cls, row: asyncpg.Record) -> UnmatchedFunds:
        return cls(
            funds_id=row["funds_id"],
            provider=row["provider"],
            provider_object_id=row["provider_object_id"],
            escrow_id=row["escrow_id"],
            commands_topic=row["commands_topic"],
            amount=int(row["amount"]),
            currency=row["currency"],
            reason=row["reason"],
            status=FundsStatus(row["status"]),
            detail=row["detail"],
            sender_address=row["sender_address"],
            return_reference=row["return_reference"],
            attempts=row["attempts"],
            last_error=row["last_error"],
        )


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    funds: UnmatchedFunds,
    now: datetime,
    screening: dict[str, Any] | None = None,
) -> bool:
    """Record ``funds`` (due now when RETURNING); False when that provider object was
    recorded before, in any status: it is left as it is."""
    inserted = await conn.fetchval(
        """
        INSERT INTO unmatched_funds (funds_id, provider, provider_object_id, escrow_id,
                                     commands_topic, amount, currency, reason, detail, status,
                                     sender_address, screening, next_attempt_at,
                                     created_at, updated_at, resolved_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                CASE WHEN $10 = 'RETURNING' THEN $13::timestamptz END, $13, $13,
                CASE WHEN $10 IN ('RETURNED', 'FROZEN') THEN $13::timestamptz END)
        ON CONFLICT (provider, provider_object_id) DO NOTHING
        RETURNING true
        """,
        funds.funds_id,
        funds.provider,
        funds.provider_object_id,
        funds.escrow_id,
        funds.commands_topic,
        funds.amount,
        funds.currency,
        funds.reason,
        fitted(funds.detail or "") or None,
        funds.status.value,
        funds.sender_address,
        screening,
        now,
    )
    if inserted:
        UNMATCHED_FUNDS.labels(funds.provider, funds.reason, funds.status.value).inc()
    return bool(inserted)


async def claim_due(
    conn: asyncpg.Connection | asyncpg.Pool,
    commands_topic: str,
    now: datetime,
    lease_until: datetime,
    limit: int,
) -> list[UnmatchedFunds]:
    """Lease up to ``limit`` due RETURNING rows of the deployment until ``lease_until``."""
    rows = await lease_due(conn, WORK, commands_topic, now, lease_until, limit)
    return [UnmatchedFunds.of(r) for r in rows]


async def return_sent(
    conn: asyncpg.Connection | asyncpg.Pool,
    funds_id: str,
    reference: str,
    check_at: datetime | None,
    now: datetime,
) -> None:
    """The provider took the return ``reference``; due again at ``check_at`` to read its
    status (None: its confirmation arrives by webhook)."""
    await conn.execute(
        """
        UPDATE unmatched_funds
           SET return_reference = $2, next_attempt_at = $3, last_error = NULL, updated_at = $4
         WHERE funds_id = $1 AND status = 'RETURNING'
        """,
        funds_id,
        reference,
        check_at,
        now,
    )


async def settle(
    conn: asyncpg.Connection | asyncpg.Pool,
    funds_id: str,
    status: FundsStatus,
    now: datetime,
    *,
    reference: str | None = None,
    error: str | None = None,
) -> bool:
    """A RETURNING row becomes RETURNED (confirmed) or NEEDS_REVIEW (refused); False when it
    was not RETURNING (confirmed before, or an operator moved it)."""
    row = await conn.fetchrow(
        """
        UPDATE unmatched_funds
           SET status = $2::text, return_reference = COALESCE($3, return_reference),
               last_error = COALESCE($4, last_error), next_attempt_at = NULL,
               updated_at = $5, resolved_at = CASE WHEN $2 = 'RETURNED' THEN $5::timestamptz END
         WHERE funds_id = $1 AND status = 'RETURNING'
        RETURNING provider, reason
        """,
        funds_id,
        status.value,
        reference,
        fitted(error) if error else None,
        now,
    )
    if row is None:
        return False
    UNMATCHED_FUNDS.labels(row["provider"], row["reason"], status.value).inc()
    return True


async def retry_later(
    conn: asyncpg.Connection | asyncpg.Pool, funds_id: str, error: str, at: datetime, now: datetime
) -> None:
    """The provider gave no answer: due again at ``at``, with the same idempotency key."""
    await conn.execute(
        """
        UPDATE unmatched_funds SET next_attempt_at = $3, last_error = $2, updated_at = $4
         WHERE funds_id = $1 AND status = 'RETURNING'
        """,
        funds_id,
        fitted(error),
        at,
        now,
    )


async def by_return_reference(
    conn: asyncpg.Connection | asyncpg.Pool, provider: str, reference: str
) -> str | None:
    """The funds id whose return the provider names ``reference`` (a Refund or transfer id,
    or our own return key), if any."""
    value = await conn.fetchval(
        """
        SELECT funds_id FROM unmatched_funds
         WHERE provider = $1 AND (return_reference = $2 OR $3 || funds_id = $2)
        """,
        provider,
        reference,
        RETURN_PREFIX,
    )
    return None if value is None else str(value)


async def by_provider_object(
    conn: asyncpg.Connection | asyncpg.Pool, provider: str, provider_object_id: str
) -> UnmatchedFunds | None:
    row = await conn.fetchrow(
        "SELECT * FROM unmatched_funds WHERE provider = $1 AND provider_object_id = $2",
        provider,
        provider_object_id,
    )
    return None if row is None else UnmatchedFunds.of(row)


class RetryRefused(Exception):
    """``funds retry`` on a row that must not be sent back (frozen, returned, unknown)."""


async def retry_now(conn: asyncpg.Connection | asyncpg.Pool, funds_id: str, now: datetime) -> None:
    """An operator sends a NEEDS_REVIEW (or stalled RETURNING) row back now, with the same
    idempotency key as before; FROZEN and RETURNED rows are refused."""
    row = await conn.fetchrow(
        """
        UPDATE unmatched_funds
           SET status = 'RETURNING', next_attempt_at = $2, updated_at = $2, resolved_at = NULL
         WHERE funds_id = $1 AND status IN ('RETURNING', 'NEEDS_REVIEW')
        RETURNING funds_id
        """,
        funds_id,
        now,
    )
    if row is not None:
        return
    status = await conn.fetchval("SELECT status FROM unmatched_funds WHERE funds_id = $1", funds_id)
    if status is None:
        raise RetryRefused(f"no unmatched funds {funds_id}")
    raise RetryRefused(f"unmatched funds {funds_id} are {status}: nothing to send back")


async def listing(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    status: FundsStatus | None = None,
    escrow_id: str | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """Unmatched funds for operators, newest first."""
    rows = await conn.fetch(
        """
        SELECT funds_id, provider, provider_object_id, escrow_id, amount, currency, reason,
               detail, status, sender_address, return_reference, attempts, last_error,
               created_at, updated_at, resolved_at
          FROM unmatched_funds
         WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR escrow_id = $2)
         ORDER BY created_at DESC, funds_id
         LIMIT $3
        """,
        status.value if status is not None else None,
        escrow_id,
        limit,
    )
    return [dict(r) for r in rows]
