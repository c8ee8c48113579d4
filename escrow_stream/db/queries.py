"""Read-only queries over the PostgreSQL mirror: the API's escrow list and history, stuck
escrows, the escrow of a PaymentIntent and ledger reconciliation."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from escrow_stream.domain import TERMINAL_STATUSES

_TERMINAL = sorted(s.value for s in TERMINAL_STATUSES)


class InvalidCursor(ValueError):
    """A list cursor this API did not issue."""


def encode_cursor(created_at: datetime, escrow_id: str) -> str:
    """The opaque cursor after the row (created_at, id) of :func:`escrow_page`."""
    raw = json.dumps([created_at.isoformat(), escrow_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, escrow_id = json.loads(raw)
        return datetime.fromisoformat(stamp), str(escrow_id)
    except (ValueError, TypeError, RecursionError):
        raise InvalidCursor(cursor) from None


@dataclass(frozen=True)
class EscrowFilter:
    """Which escrows a list shows: ``viewer`` (None: everyone's, for admins) as buyer, seller
    or either (``role`` None); optionally one status and one rail."""

    viewer: str | None = None
    role: Literal["buyer", "seller"] | None = None
    status: str | None = None
    rail: str | None = None


async def escrow_page(
    pool: asyncpg.Pool, where: EscrowFilter, limit: int, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` stored snapshots, newest first (created_at, then id), after
    ``cursor``; and the cursor of the next page, None on the last (:class:`InvalidCursor`)."""
    conditions: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if where.viewer is not None:
        me = arg(where.viewer)
        conditions.append(
            {"buyer": f"buyer_id = {me}", "seller": f"seller_id = {me}"}.get(
                where.role or "", f"(buyer_id = {me} OR seller_id = {me})"
            )
        )
    for column, value in (("status", where.status), ("rail", where.rail)):
        if value:
            conditions.append(f"{column} = {arg(value)}")
    if cursor:
        created_at, escrow_id = decode_cursor(cursor)
        conditions.append(f"(created_at, id) < ({arg(created_at)}, {arg(escrow_id)})")
    clause = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = await pool.fetch(
        f"SELECT id, created_at, snapshot FROM escrows {clause} "
        f"ORDER BY created_at DESC, id DESC LIMIT {arg(limit + 1)}",
        *args,
    )
    page = rows[:limit]
    following = encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
    return [r["snapshot"] for r in page], following


async def escrow_parties(pool: asyncpg.Pool, escrow_id: str) -> dict[str, str] | None:
    """``{"buyerId", "sellerId"}`` of a mirrored escrow, None when it is not mirrored."""
    row = await pool.fetchrow("SELECT buyer_id, seller_id FROM escrows WHERE id = $1", escrow_id)
    return None if row is None else {"buyerId": row["buyer_id"], "sellerId": row["seller_id"]}


async def escrow_history(pool: asyncpg.Pool, escrow_id: str) -> list[dict[str, Any]]:
    """The escrow's mirrored events in version order, as the API shows them."""
    rows = await pool.fetch(
        "SELECT event_id, event_type, version, occurred_at, causation_id, data "
        "FROM escrow_events WHERE escrow_id = $1 ORDER BY version",
        escrow_id,
    )
    return [
        {
            "eventId": str(r["event_id"]),
            "type": r["event_type"],
            "version": r["version"],
            "occurredAt": r["occurred_at"].isoformat(),
            "causationId": r["causation_id"],
            "data": r["data"],
        }
        for r in rows
    ]


_STUCK_SQL = """
    WITH e AS (
        SELECT id, status, version, updated_at, expires_at, auto_refund_at, settlement,
               snapshot -> 'chargeback' ->> 'status' AS chargeback,
               CASE WHEN rail = 'STRIPE' AND status <> ALL($2::text[])
                         AND funded_amount - released_amount - refunded_amount > 0
                    THEN $1::timestamptz - (snapshot -> 'payment' ->> 'fundedAt')::timestamptz
               END AS held_for
          FROM escrows
         WHERE ($3::text[] IS NULL OR id = ANY($3::text[]))
    )
    SELECT id, status, version, updated_at, expires_at, auto_refund_at,
           CASE WHEN settlement ->> 'status' = 'AWAITING_PAYOUT_ACCOUNT'
                     AND status <> ALL($2::text[]) THEN 'payout_account'
                WHEN chargeback = 'OPEN' THEN 'chargeback_open'
                WHEN chargeback = 'LOST' AND status = 'RELEASED' THEN 'chargeback_lost'
                WHEN held_for > make_interval(days => $5::int) THEN 'hold_max'
                WHEN held_for > make_interval(days => $4::int) THEN 'hold_warning'
                ELSE 'timeout' END AS waiting_for
      FROM e
     WHERE (status <> ALL($2::text[])
            AND ((status = 'AWAIT_FUNDS' AND expires_at < $1)
                 OR (status = 'DELIVERED' AND auto_refund_at < $1)
                 OR settlement ->> 'status' = 'AWAITING_PAYOUT_ACCOUNT'))
        OR chargeback = 'OPEN'
        OR (chargeback = 'LOST' AND status = 'RELEASED')
        OR held_for > make_interval(days => $4::int)
     ORDER BY updated_at, id
"""


async def stuck_escrows(
    pool: asyncpg.Pool,
    now: datetime,
    escrow_ids: Sequence[str] | None = None,
    *,
    hold_warn_days: int = 80,
    hold_max_days: int = 90,
) -> list[dict[str, Any]]:
    """The seed's "State Machine Recovery" query: escrows a timeout should have moved, and
    releases waiting for the seller's payout account (SPEC §10); plus the card money at risk
    (SPEC §10 chargebacks and holding limits).

    ``waiting_for`` says why, first match wins:

    * ``payout_account``: a settlement AWAITING_PAYOUT_ACCOUNT (not terminal);
    * ``chargeback_open``: a chargeback is open (any status: releases wait for it);
    * ``chargeback_lost``: a chargeback was lost after the funds were RELEASED (the seller's
      receivable is for an operator to collect);
    * ``hold_max`` / ``hold_warning``: a STRIPE escrow still holding funds more than
      ``hold_max_days`` (STRIPE_MAX_HOLD_DAYS) / ``hold_warn_days`` (STRIPE_HOLD_WARN_DAYS)
      after funding;
    * ``timeout``: AWAIT_FUNDS past ``expires_at``, DELIVERED past ``auto_refund_at``;

    optionally only among ``escrow_ids``, oldest update first.
    """
    rows = await pool.fetch(
        _STUCK_SQL,
        now,
        _TERMINAL,
        list(escrow_ids) if escrow_ids is not None else None,
        hold_warn_days,
        hold_max_days,
    )
    return [dict(r) for r in rows]


async def escrow_for_payment_intent(pool: asyncpg.Pool, payment_intent_id: str) -> str | None:
    """The escrow a Stripe PaymentIntent belongs to, from our own records: the payments
    agent's INSTRUCTIONS effect that created it, else the mirror's snapshot (a Stripe
    dispute names the PaymentIntent, never our escrow)."""
    found: str | None = await pool.fetchval(
        """
        SELECT escrow_id FROM payment_effects
         WHERE effect = 'INSTRUCTIONS' AND provider_object_id = $1
         LIMIT 1
        """,
        payment_intent_id,
    )
    if found is None:
        found = await pool.fetchval(
            """
            SELECT id FROM escrows
             WHERE snapshot -> 'payment' ->> 'providerPaymentId' = $1
                OR snapshot -> 'payment' ->> 'fundedProviderPaymentId' = $1
             LIMIT 1
            """,
            payment_intent_id,
        )
    return found


#: Each ledger check: its SQL (``$1``: the escrow ids or NULL for all) and how a row reads.
_POSTING_BALANCE_SQL = """
    SELECT escrow_id, event_id, currency, sum(amount) AS total
      FROM ledger_entries
     WHERE $1::text[] IS NULL OR escrow_id = ANY($1::text[])
     GROUP BY escrow_id, event_id, currency
    HAVING sum(amount) <> 0
     ORDER BY escrow_id, event_id
"""


def _posting_balance(r: asyncpg.Record) -> list[str]:
    return [
        f"escrow {r['escrow_id']}: posting {r['event_id']} in {r['currency']} "
        f"sums to {r['total']}, not 0"
    ]


_HOLDING_SQL = """
    SELECT e.id, e.funded_amount, e.released_amount, e.refunded_amount,
           COALESCE(h.total, 0) AS holding
      FROM escrows e
      LEFT JOIN (SELECT escrow_id, sum(amount) AS total
                   FROM ledger_entries
                  WHERE account = 'escrow:' || escrow_id || ':holding'
                  GROUP BY escrow_id) h ON h.escrow_id = e.id
     WHERE ($1::text[] IS NULL OR e.id = ANY($1::text[]))
       AND (COALESCE(h.total, 0) < 0
            OR e.released_amount + e.refunded_amount > e.funded_amount
            OR COALESCE(h.total, 0)
               <> e.funded_amount - e.released_amount - e.refunded_amount)
     ORDER BY e.id
"""


def _holding(r: asyncpg.Record) -> list[str]:
    funded, released, refunded = r["funded_amount"], r["released_amount"], r["refunded_amount"]
    problems = []
    if r["holding"] < 0:
        problems.append(f"escrow {r['id']}: holding balance is negative: {r['holding']}")
    if released + refunded > funded:
        problems.append(
            f"escrow {r['id']}: released {released} + refunded {refunded} exceeds funded {funded}"
        )
    if r["holding"] != funded - released - refunded:
        problems.append(
            f"escrow {r['id']}: holding balance {r['holding']} != funded - released "
            f"- refunded {funded - released - refunded}"
        )
    return problems


_POSTING_COUNT_SQL = """
    WITH mirrored AS (
        SELECT escrow_id, count(DISTINCT event_id) AS postings
          FROM ledger_entries
         WHERE $1::text[] IS NULL OR escrow_id = ANY($1::text[])
         GROUP BY escrow_id
    )
    SELECT COALESCE(e.id, m.escrow_id) AS id,
           e.id IS NULL AS orphan,
           COALESCE(jsonb_array_length(e.snapshot -> 'ledger'), 0) AS expected,
           COALESCE(m.postings, 0) AS actual
      FROM (SELECT id, snapshot FROM escrows
             WHERE $1::text[] IS NULL OR id = ANY($1::text[])) e
      FULL JOIN mirrored m ON m.escrow_id = e.id
     WHERE e.id IS NULL
        OR COALESCE(jsonb_array_length(e.snapshot -> 'ledger'), 0) <> COALESCE(m.postings, 0)
     ORDER BY 1
"""


def _posting_count(r: asyncpg.Record) -> list[str]:
    if r["orphan"]:
        return [f"escrow {r['id']}: ledger entries but no escrows row"]
    return [f"escrow {r['id']}: {r['actual']} postings mirrored, snapshot has {r['expected']}"]


_LINES_SQL = """
    WITH expected AS (
        SELECT e.id AS escrow_id, p.posting ->> 'postingId' AS posting_id,
               l.line_no::int AS line_no, p.posting ->> 'currency' AS currency,
               l.line ->> 'account' AS account, (l.line ->> 'amount')::numeric AS amount
          FROM escrows e
         CROSS JOIN LATERAL jsonb_array_elements(e.snapshot -> 'ledger') AS p(posting)
         CROSS JOIN LATERAL jsonb_array_elements(p.posting -> 'lines')
               WITH ORDINALITY AS l(line, line_no)
         WHERE $1::text[] IS NULL OR e.id = ANY($1::text[])
    ),
    actual AS (
        SELECT le.escrow_id, le.event_id::text AS posting_id, le.line_no, le.currency,
               le.account, le.amount::numeric AS amount
          FROM ledger_entries le
          JOIN escrows e ON e.id = le.escrow_id
         WHERE $1::text[] IS NULL OR le.escrow_id = ANY($1::text[])
    )
    SELECT COALESCE(x.escrow_id, a.escrow_id) AS escrow_id,
           COALESCE(x.posting_id, a.posting_id) AS posting_id,
           COALESCE(x.line_no, a.line_no) AS line_no,
           x.account AS expected_account, x.currency AS expected_currency,
           x.amount AS expected_amount,
           a.account AS actual_account, a.currency AS actual_currency,
           a.amount AS actual_amount
      FROM expected x
      FULL JOIN actual a
        ON a.escrow_id = x.escrow_id AND a.posting_id = x.posting_id AND a.line_no = x.line_no
     WHERE x.escrow_id IS NULL OR a.escrow_id IS NULL
        OR x.account IS DISTINCT FROM a.account
        OR x.currency IS DISTINCT FROM a.currency
        OR x.amount IS DISTINCT FROM a.amount
     ORDER BY 1, 2, 3
"""


def _lines(r: asyncpg.Record) -> list[str]:
    where = f"escrow {r['escrow_id']}: posting {r['posting_id']} line {r['line_no']}"
    if r["actual_account"] is None:
        return [f"{where} is in the snapshot but not mirrored"]
    if r["expected_account"] is None:
        return [f"{where} is mirrored but not in the snapshot"]
    return [
        f"{where} differs: mirrored {r['actual_account']} {r['actual_amount']} "
        f"{r['actual_currency']}, snapshot {r['expected_account']} {r['expected_amount']} "
        f"{r['expected_currency']}"
    ]


_LEDGER_CHECKS = (
    (_POSTING_BALANCE_SQL, _posting_balance),
    (_HOLDING_SQL, _holding),
    (_POSTING_COUNT_SQL, _posting_count),
    (_LINES_SQL, _lines),
)


async def reconcile(pool: asyncpg.Pool, escrow_ids: Sequence[str] | None = None) -> list[str]:
    """Every money invariant the mirror violates, as readable strings (empty = fine).

    Checked per escrow (optionally only ``escrow_ids``), in one consistent snapshot:

    * each posting (eventId) sums to zero per currency in ``ledger_entries``;
    * the holding account ``escrow:{id}:holding`` is never negative in sum, and equals
      funded - released - refunded of the ``escrows`` row;
    * released + refunded <= funded in ``escrows``;
    * the mirrored ledger equals the ledger of ``escrows.snapshot``: the same number of
      postings and the same lines (posting, line number, account, currency, amount);
    * no ledger line belongs to an escrow the mirror does not have.
    """
    ids = list(escrow_ids) if escrow_ids is not None else None
    problems: list[str] = []
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        for sql, read in _LEDGER_CHECKS:
            for row in await conn.fetch(sql, ids):
                problems.extend(read(row))
    return problems
