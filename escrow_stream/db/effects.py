"""Payment effects (``payment_effects``): each provider call of the payments agent, recorded
STARTED before the call and SUCCEEDED / FAILED after it, so no effect is ever made twice.

The key is the settlement id for a settlement, ``instructions:{escrowId}`` for a PaymentIntent
or deposit address.  An effect is recorded once (``ON CONFLICT DO NOTHING``); a STARTED one is
due at ``next_attempt_at`` and claimed by one worker at a time (``FOR UPDATE SKIP LOCKED``,
then leased by pushing ``next_attempt_at`` past the call).  A ``held`` one (a settlement
while its escrow's chargeback is open) is never claimed until the hold is released.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from escrow_stream.db.leases import WorkTable, lease_due
from escrow_stream.domain import fitted

#: Due: recorded, not yet answered, and not held back by an open chargeback.
WORK = WorkTable("payment_effects", "effect_key", "state = 'STARTED' AND NOT held")


class EffectKind(StrEnum):
    INSTRUCTIONS = "INSTRUCTIONS"  # a PaymentIntent or a deposit address
    SETTLEMENT = "SETTLEMENT"  # a transfer or a refund
    CANCEL_INSTRUCTIONS = "CANCEL_INSTRUCTIONS"  # an unfunded, cancelled escrow's PaymentIntent


class EffectState(StrEnum):
    STARTED = "STARTED"  # recorded before the call; due again while the outcome is unknown
    SUCCEEDED = "SUCCEEDED"  # the provider made the object
    FAILED = "FAILED"  # the provider refused for good


def instructions_key(escrow_id: str) -> str:
    """The effect key of an escrow's payment instructions."""
    return f"instructions:{escrow_id}"


def cancel_instructions_key(escrow_id: str) -> str:
    """The effect key of the cancellation of an escrow's PaymentIntent."""
    return f"cancel-instructions:{escrow_id}"


@dataclass(frozen=True)
class Effect:
    """One recorded effect as the runner performs it."""

    key: str
    escrow_id: str
    commands_topic: str  # where its result command goes (the deployment that recorded it)
    kind: EffectKind
    rail: str
    provider: str
    attempts: int
    event: dict[str, Any]  # the event that asked for it, with the escrow's snapshot

    @classmethod
    def of(cls, row: asyncpg.Record) -> Effect:
        return cls(
            key=row["effect_key"],
            escrow_id=row["escrow_id"],
            commands_topic=row["commands_topic"],
            kind=EffectKind(row["effect"]),
            rail=row["rail"],
            provider=row["provider"],
            attempts=row["attempts"],
            event=row["event"],
        )


@dataclass(frozen=True)
class EffectResult:
    """What the provider answered, and the command that reports it (None: none to send)."""

    state: EffectState
    provider_object_id: str | None = None
    result_type: str | None = None
    result_payload: dict[str, Any] | None = None
    client_secret: str | None = None
    error_code: str | None = None
    error_message: str | None = None


async def start(
    conn: asyncpg.Connection | asyncpg.Pool,
    key: str,
    kind: EffectKind,
    rail: str,
    provider: str,
    event: dict[str, Any],
    commands_topic: str,
    now: datetime,
    held: bool = False,
) -> bool:
    """Record the effect STARTED and due now (``held``: not due while a chargeback is open);
    False when it was recorded before (in any state), which the caller leaves alone."""
    inserted = await conn.fetchval(
        """
        INSERT INTO payment_effects (effect_key, escrow_id, commands_topic, effect, rail,
                                     provider, state, next_attempt_at, event, created_at,
                                     updated_at, held)
        VALUES ($1, $2, $8, $3, $4, $5, 'STARTED', $6, $7, $6, $6, $9)
        ON CONFLICT (effect_key) DO NOTHING
        RETURNING true
        """,
        key,
        event["escrowId"],
        kind.value,
        rail,
        provider,
        now,
        event,
        commands_topic,
        held,
    )
    return bool(inserted)


async def claim_due(
    conn: asyncpg.Connection | asyncpg.Pool,
    commands_topic: str,
    now: datetime,
    lease_until: datetime,
    limit: int,
) -> list[Effect]:
    """Lease up to ``limit`` due STARTED effects of the deployment (its commands topic) to
    the caller until ``lease_until``; other workers skip them meanwhile, and take them over
    only if the lease runs out."""
    rows = await lease_due(conn, WORK, commands_topic, now, lease_until, limit)
    return [Effect.of(r) for r in rows]


async def finish(conn: asyncpg.Connection, key: str, outcome: EffectResult, now: datetime) -> bool:
    """Record the outcome of a STARTED effect; False when it was already finished."""
    updated = await conn.fetchval(
        """
        UPDATE payment_effects
           SET state = $2, provider_object_id = $3, result_type = $4, result_payload = $5,
               client_secret = $6, error_code = $7, error_message = $8,
               next_attempt_at = NULL, updated_at = $9
         WHERE effect_key = $1 AND state = 'STARTED'
        RETURNING true
        """,
        key,
        outcome.state.value,
        outcome.provider_object_id,
        outcome.result_type,
        outcome.result_payload,
        outcome.client_secret,
        outcome.error_code,
        outcome.error_message,
        now,
    )
    return bool(updated)


async def retry_later(
    conn: asyncpg.Connection | asyncpg.Pool, key: str, error: str, at: datetime, now: datetime
) -> None:
    """The outcome is unknown: due again at ``at``, still STARTED, with the last error."""
    await conn.execute(
        """
        UPDATE payment_effects
           SET next_attempt_at = $3, error_message = $2, updated_at = $4
         WHERE effect_key = $1 AND state = 'STARTED'
        """,
        key,
        fitted(error),
        at,
        now,
    )


async def set_held(
    conn: asyncpg.Connection | asyncpg.Pool, key: str, held: bool, now: datetime
) -> bool:
    """Hold a STARTED effect (a chargeback opened: the runner skips it), or release the hold
    and make it due now; True when the effect changed."""
    changed = await conn.fetchval(
        """
        UPDATE payment_effects
           SET held = $2, updated_at = $3,
               next_attempt_at = CASE WHEN $2 THEN next_attempt_at ELSE $3 END
         WHERE effect_key = $1 AND state = 'STARTED' AND held <> $2
        RETURNING true
        """,
        key,
        held,
        now,
    )
    return bool(changed)


async def fail_held(
    conn: asyncpg.Connection | asyncpg.Pool,
    escrow_id: str,
    error_code: str,
    error_message: str,
    now: datetime,
) -> list[str]:
    """FAIL the escrow's held settlement effects, never to be performed (a lost chargeback
    ended the escrow: the card network moved the money); their keys."""
    rows = await conn.fetch(
        """
        UPDATE payment_effects
           SET state = 'FAILED', error_code = $2, error_message = $3,
               next_attempt_at = NULL, updated_at = $4
         WHERE escrow_id = $1 AND effect = 'SETTLEMENT' AND state = 'STARTED' AND held
        RETURNING effect_key
        """,
        escrow_id,
        error_code,
        error_message,
        now,
    )
    return [r["effect_key"] for r in rows]


async def get(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM payment_effects WHERE effect_key = $1", key
    )
    return row


async def mirrored_escrow(
    conn: asyncpg.Connection | asyncpg.Pool, escrow_id: str
) -> tuple[int, dict[str, Any]] | None:
    """The PostgreSQL mirror's version and snapshot of an escrow, if it has it yet."""
    row = await conn.fetchrow("SELECT version, snapshot FROM escrows WHERE id = $1", escrow_id)
    return None if row is None else (int(row["version"]), dict(row["snapshot"]))
