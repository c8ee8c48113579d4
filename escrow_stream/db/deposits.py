"""Custodian deposits (``custodian_deposits``): recorded by the webhook, screened by the
deposit-screening loop, kept as the compliance record (FROZEN ones wait for a human).

A deposit is recorded once per custodian deposit id, whichever webhook delivery (or event id)
brings it: ``ON CONFLICT DO NOTHING``; with the commands topic of the deployment that recorded
it, whose screening loop alone screens it (several deployments may share one database).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from escrow_stream.domain import fitted


class DepositStatus(StrEnum):
    SCREENING = "SCREENING"  # waiting for (or retrying) TRM and Chainalysis
    CLEARED = "CLEARED"  # both passed: ConfirmFunds was enqueued
    FROZEN = "FROZEN"  # a provider flagged the sender: escrow cancelled, funds kept for review


@dataclass(frozen=True)
class Deposit:
    deposit_id: str
    escrow_id: str
    deposit_address: str
    sender_address: str
    tx_hash: str | None
    amount: int
    asset: str
    confirmations: int


async def record(
    conn: asyncpg.Connection | asyncpg.Pool, deposit: Deposit, commands_topic: str, now: datetime
) -> bool:
    """Record a confirmed deposit for screening; False when it was already recorded."""
    inserted = await conn.fetchval(
        """
        INSERT INTO custodian_deposits (deposit_id, escrow_id, deposit_address, sender_address,
                                        tx_hash, amount, asset, confirmations, status,
                                        next_attempt_at, received_at, commands_topic)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'SCREENING', $9, $9, $10)
        ON CONFLICT (deposit_id) DO NOTHING
        RETURNING true
        """,
        deposit.deposit_id,
        deposit.escrow_id,
        deposit.deposit_address,
        deposit.sender_address,
        deposit.tx_hash,
        deposit.amount,
        deposit.asset,
        deposit.confirmations,
        now,
        commands_topic,
    )
    return bool(inserted)


async def claim_due(
    conn: asyncpg.Connection, commands_topic: str, now: datetime
) -> asyncpg.Record | None:
    """Lock the deployment's oldest deposit due for screening (inside the caller's
    transaction); other workers skip it, so each deposit is screened by one of them at a
    time."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT * FROM custodian_deposits
         WHERE status = 'SCREENING' AND next_attempt_at <= $1
           AND (commands_topic = $2 OR commands_topic IS NULL)
         ORDER BY next_attempt_at, received_at
         LIMIT 1
         FOR UPDATE SKIP LOCKED
        """,
        now,
        commands_topic,
    )
    return row


async def retry_later(conn: asyncpg.Connection, deposit_id: str, error: str, at: datetime) -> None:
    await conn.execute(
        """
        UPDATE custodian_deposits
           SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3
         WHERE deposit_id = $1
        """,
        deposit_id,
        fitted(error),
        at,
    )


async def record_screening(
    conn: asyncpg.Connection,
    deposit_id: str,
    status: DepositStatus,
    screening: dict[str, Any],
    now: datetime,
) -> None:
    await conn.execute(
        """
        UPDATE custodian_deposits
           SET status = $2, screening = $3, screened_at = $4,
               attempts = attempts + 1, last_error = NULL
         WHERE deposit_id = $1
        """,
        deposit_id,
        status.value,
        screening,  # the pool's jsonb codec encodes it
        now,
    )
    if status is DepositStatus.FROZEN:  # the mirror's rail row, when it is there already
        await conn.execute(
            """
            UPDATE stablecoin_escrows SET frozen = true, updated_at = $2
             WHERE escrow_id = (SELECT escrow_id FROM custodian_deposits WHERE deposit_id = $1)
            """,
            deposit_id,
            now,
        )


async def listing(
    pool: asyncpg.Pool, status: DepositStatus | None = None, escrow_id: str | None = None
) -> list[dict[str, Any]]:
    """Deposits for compliance review (``escrow-stream deposits list``), oldest first."""
    rows = await pool.fetch(
        """
        SELECT deposit_id, escrow_id, status, amount, asset, sender_address, deposit_address,
               tx_hash, confirmations, attempts, last_error, screening, received_at,
               screened_at, next_attempt_at
          FROM custodian_deposits
         WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR escrow_id = $2)
         ORDER BY received_at, deposit_id
        """,
        status.value if status is not None else None,
        escrow_id,
    )
    return [dict(r) for r in rows]
