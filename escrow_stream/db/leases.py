"""Leasing due rows: how workers share the rows of a work table without doing one twice.

``payment_effects`` and ``unmatched_funds`` are worked the same way: a row is due when its
state says there is work and ``next_attempt_at`` has come; a worker claims up to ``limit``
due rows of its deployment (``commands_topic``) with ``FOR UPDATE SKIP LOCKED`` and leases
them by pushing ``next_attempt_at`` to ``lease_until`` (and counting the attempt), so other
workers skip them meanwhile and take them over only if the lease runs out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class WorkTable:
    """A table worked by leases; every part is a constant of this package, never input."""

    name: str
    key: str  # the primary key column
    due: str  # the SQL condition of a row with work to do


async def lease_due(
    conn: asyncpg.Connection | asyncpg.Pool,
    table: WorkTable,
    commands_topic: str,
    now: datetime,
    lease_until: datetime,
    limit: int,
) -> list[asyncpg.Record]:
    """Lease up to ``limit`` due rows of the deployment to the caller until ``lease_until``."""
    if limit <= 0:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        UPDATE {table.name} t
           SET next_attempt_at = $2, attempts = t.attempts + 1, updated_at = $1
         WHERE t.{table.key} IN (
               SELECT {table.key} FROM {table.name}
                WHERE {table.due} AND commands_topic = $4 AND next_attempt_at <= $1
                ORDER BY next_attempt_at
                LIMIT $3
                  FOR UPDATE SKIP LOCKED)
        RETURNING t.*
        """,
        now,
        lease_until,
        limit,
        commands_topic,
    )
    return rows
