"""Payout accounts (``payout_accounts``): one per seller and rail, read when a release is asked.

Only an ACTIVE account is ever paid.  A Stripe account becomes ACTIVE when Stripe says its
payouts are enabled (``account.updated``); a wallet when TRM Labs and Chainalysis both
cleared it.  ``activated_at`` changes each time an account (re)becomes ACTIVE or gets a new
destination while ACTIVE: it names the activation that resumes the releases waiting for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeAlias

import asyncpg

from escrow_stream.db.pool import Database
from escrow_stream.domain import (
    PayoutDestination,
    Rail,
    StripeAccountDestination,
    WalletDestination,
    fitted,
)


class PayoutStatus(StrEnum):
    PENDING = "PENDING"  # onboarding at Stripe, or the wallet's screening is still due
    ACTIVE = "ACTIVE"  # releases on this rail pay it
    REJECTED = "REJECTED"  # the wallet was flagged (or an admin blocked it): never paid


@dataclass(frozen=True)
class PayoutAccount:
    user_id: str
    rail: Rail
    destination: str
    status: PayoutStatus
    screening: dict[str, Any] | None
    last_error: str | None
    activated_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: asyncpg.Record) -> PayoutAccount:
        return cls(
            user_id=row["user_id"],
            rail=Rail(row["rail"]),
            destination=row["destination"],
            status=PayoutStatus(row["status"]),
            screening=row["screening"],
            last_error=row["last_error"],
            activated_at=row["activated_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def payout_destination(self) -> PayoutDestination:
        """The destination a settlement records for this account."""
        if self.rail is Rail.STRIPE:
            return StripeAccountDestination(account_id=self.destination)
        return WalletDestination(address=self.destination)

    def as_json(self) -> dict[str, Any]:
        """The API's view (``GET /api/payout-accounts/…``)."""
        body: dict[str, Any] = {"userId": self.user_id, "rail": self.rail.value}
        body["accountId" if self.rail is Rail.STRIPE else "walletAddress"] = self.destination
        body["status"] = self.status.value
        if self.screening is not None:
            body["screening"] = self.screening
        if self.last_error is not None and self.status is PayoutStatus.PENDING:
            body["lastError"] = self.last_error
        body["createdAt"] = self.created_at.isoformat()
        body["updatedAt"] = self.updated_at.isoformat()
        return body


Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool


async def get(conn: Conn, user_id: str, rail: Rail) -> PayoutAccount | None:
    row = await conn.fetchrow(
        "SELECT * FROM payout_accounts WHERE user_id = $1 AND rail = $2", user_id, rail.value
    )
    return None if row is None else PayoutAccount.of(row)


async def of_user(conn: Conn, user_id: str) -> list[PayoutAccount]:
    rows = await conn.fetch(
        "SELECT * FROM payout_accounts WHERE user_id = $1 ORDER BY rail", user_id
    )
    return [PayoutAccount.of(r) for r in rows]


async def put(
    conn: Conn,
    user_id: str,
    rail: Rail,
    destination: str,
    status: PayoutStatus,
    now: datetime,
    updated_by: str,
    screening: dict[str, Any] | None = None,
    next_screening_at: datetime | None = None,
    last_error: str | None = None,
) -> PayoutAccount:
    """Set the user's account for ``rail`` (insert or replace); the stored account."""
    row = await conn.fetchrow(
        """
        INSERT INTO payout_accounts AS p (user_id, rail, destination, status, screening,
                                          next_screening_at, last_error, activated_at,
                                          updated_by, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7,
                CASE WHEN $4 = 'ACTIVE' THEN $8::timestamptz END, $9, $8, $8)
        ON CONFLICT (user_id, rail) DO UPDATE
           SET destination = EXCLUDED.destination, status = EXCLUDED.status,
               screening = EXCLUDED.screening, next_screening_at = EXCLUDED.next_screening_at,
               last_error = EXCLUDED.last_error, updated_by = EXCLUDED.updated_by,
               updated_at = EXCLUDED.updated_at,
               attempts = CASE WHEN p.destination = EXCLUDED.destination
                               THEN p.attempts ELSE 0 END,
               activated_at = CASE
                   WHEN EXCLUDED.status <> 'ACTIVE' THEN NULL
                   WHEN p.status = 'ACTIVE' AND p.destination = EXCLUDED.destination
                   THEN p.activated_at
                   ELSE EXCLUDED.updated_at END
        RETURNING *
        """,
        user_id,
        rail.value,
        destination,
        status.value,
        screening,
        next_screening_at,
        last_error,
        now,
        updated_by,
    )
    return PayoutAccount.of(row)


async def add_if_absent(
    conn: Conn, user_id: str, rail: Rail, destination: str, now: datetime, updated_by: str
) -> PayoutAccount:
    """A PENDING account unless the user has one for ``rail`` already; the stored one."""
    await conn.execute(
        """
        INSERT INTO payout_accounts (user_id, rail, destination, status, updated_by,
                                     created_at, updated_at)
        VALUES ($1, $2, $3, 'PENDING', $4, $5, $5)
        ON CONFLICT (user_id, rail) DO NOTHING
        """,
        user_id,
        rail.value,
        destination,
        updated_by,
        now,
    )
    account = await get(conn, user_id, rail)
    assert account is not None
    return account


async def set_stripe_payouts(
    conn: asyncpg.Connection, account_id: str, enabled: bool, event_at: datetime, now: datetime
) -> list[PayoutAccount]:
    """Stripe's word on a Connect account: ACTIVE when payouts are enabled, else PENDING.

    A rejected account stays rejected; an event older than the last one applied changes
    nothing (Stripe does not deliver in order).  The accounts whose status changed.
    """
    rows = await conn.fetch(
        """
        UPDATE payout_accounts
           SET status = $2, provider_event_at = $3, updated_at = $4, updated_by = 'stripe',
               activated_at = CASE WHEN $2 = 'ACTIVE' THEN $4::timestamptz END
         WHERE rail = 'STRIPE' AND destination = $1 AND status IN ('PENDING', 'ACTIVE')
           AND status <> $2
           AND (provider_event_at IS NULL OR provider_event_at <= $3)
        RETURNING *
        """,
        account_id,
        (PayoutStatus.ACTIVE if enabled else PayoutStatus.PENDING).value,
        event_at,
        now,
    )
    await conn.execute(  # the newest event seen, also when it changed nothing
        """
        UPDATE payout_accounts SET provider_event_at = $2
         WHERE rail = 'STRIPE' AND destination = $1
           AND (provider_event_at IS NULL OR provider_event_at < $2)
        """,
        account_id,
        event_at,
    )
    return [PayoutAccount.of(r) for r in rows]


async def claim_due_screening(conn: asyncpg.Connection, now: datetime) -> asyncpg.Record | None:
    """Lock the oldest PENDING wallet due for screening again (caller's transaction)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT * FROM payout_accounts
         WHERE status = 'PENDING' AND rail = 'USDC_BASE' AND next_screening_at <= $1
         ORDER BY next_screening_at
         LIMIT 1
         FOR UPDATE SKIP LOCKED
        """,
        now,
    )
    return row


async def screening_failed(
    conn: asyncpg.Connection, user_id: str, error: str, at: datetime, now: datetime
) -> None:
    """A provider had no answer: stays PENDING, screened again at ``at``."""
    await conn.execute(
        """
        UPDATE payout_accounts
           SET attempts = attempts + 1, last_error = $2, next_screening_at = $3,
               updated_at = $4
         WHERE user_id = $1 AND rail = 'USDC_BASE'
        """,
        user_id,
        fitted(error),
        at,
        now,
    )


@dataclass(frozen=True)
class AwaitingRelease:
    """A release in the mirror waiting for a payout account that is ACTIVE now."""

    escrow_id: str
    settlement_id: str
    seller_id: str
    destination: str
    activated_at: datetime


async def awaiting_releases(
    conn: Conn, seller_id: str | None = None, limit: int = 100
) -> list[AwaitingRelease]:
    """Releases the mirror shows AWAITING_PAYOUT_ACCOUNT whose seller's account for the
    escrow's rail is ACTIVE (optionally one seller's), not yet resumed for that activation
    is for the caller to check."""
    rows = await conn.fetch(
        """
        SELECT e.id, e.settlement ->> 'settlementId' AS settlement_id, e.seller_id,
               p.destination, p.activated_at
          FROM escrows e
          JOIN payout_accounts p
            ON p.user_id = e.seller_id AND p.rail = e.rail AND p.status = 'ACTIVE'
         WHERE e.settlement ->> 'status' = 'AWAITING_PAYOUT_ACCOUNT'
           AND e.settlement ->> 'settlementId' IS NOT NULL
           AND ($1::text IS NULL OR e.seller_id = $1)
         ORDER BY e.updated_at, e.id
         LIMIT $2
        """,
        seller_id,
        limit,
    )
    return [
        AwaitingRelease(
            r["id"], r["settlement_id"], r["seller_id"], r["destination"], r["activated_at"]
        )
        for r in rows
    ]


async def claim_resume(
    conn: asyncpg.Connection, command_id: str, release: AwaitingRelease, now: datetime
) -> bool:
    """True the first time this ResumeSettlement is claimed (then enqueue it, same
    transaction); False when it was enqueued before."""
    inserted = await conn.fetchval(
        """
        INSERT INTO payout_resumes (command_id, escrow_id, settlement_id, user_id, created_at)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (command_id) DO NOTHING
        RETURNING true
        """,
        command_id,
        release.escrow_id,
        release.settlement_id,
        release.seller_id,
        now,
    )
    return bool(inserted)


async def count_awaiting(conn: Conn) -> int:
    """Releases the mirror shows waiting for a payout account (all sellers)."""
    value: int = await conn.fetchval(
        "SELECT count(*) FROM escrows WHERE settlement ->> 'status' = 'AWAITING_PAYOUT_ACCOUNT'"
    )
    return value


class PayoutDirectory:
    """The processor's lookup: a seller's ACTIVE payout destination for a rail."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def active(self, user_id: str, rail: Rail) -> PayoutDestination | None:
        pool = await self._database.pool()
        account = await get(pool, user_id, rail)
        if account is None or account.status is not PayoutStatus.ACTIVE:
            return None
        return account.payout_destination()
