"""Operating: stuck escrows, deposits, unmatched funds, reconciliation, outbox replay,
the idempotency purge."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from escrow_stream.cli._base import echo_rows, main, on_database, settings_of


@main.group()
def escrows() -> None:
    """Escrows in the PostgreSQL mirror (runbook queries)."""


@escrows.command("stuck")
@click.pass_context
def escrows_stuck(ctx: click.Context) -> None:
    """List escrows past a deadline that a timeout should have moved (seed's query), releases
    waiting for a payout account, open chargebacks, chargebacks lost after release, and
    STRIPE escrows holding funds past STRIPE_HOLD_WARN_DAYS / STRIPE_MAX_HOLD_DAYS."""
    from escrow_stream.clock import utc_now
    from escrow_stream.db.queries import stuck_escrows

    settings = settings_of(ctx)
    rows = on_database(
        ctx,
        lambda pool: stuck_escrows(
            pool,
            utc_now(),
            hold_warn_days=settings.stripe_hold_warn_days,
            hold_max_days=settings.stripe_max_hold_days,
        ),
    )
    echo_rows(rows, "stuck escrow(s)")


@main.group()
def deposits() -> None:
    """USDC deposits the custodian reported, and their risk screening."""


@deposits.command("list")
@click.option(
    "--status",
    type=click.Choice(["SCREENING", "CLEARED", "FROZEN"]),
    help="Only these; FROZEN ones wait for compliance review.",
)
@click.option("--escrow-id", help="Only this escrow's deposits.")
@click.pass_context
def deposits_list(ctx: click.Context, status: str | None, escrow_id: str | None) -> None:
    """One JSON line per deposit, oldest first (amounts in USDC base units)."""
    from escrow_stream.db.deposits import DepositStatus, listing

    wanted = DepositStatus(status) if status else None
    echo_rows(on_database(ctx, lambda pool: listing(pool, wanted, escrow_id)), "deposit(s)")


@main.group()
def funds() -> None:
    """Unmatched funds: money no escrow accepted, returned to its payer or frozen."""


FUNDS_COLUMNS = ("funds_id", "status", "reason", "amount", "currency", "escrow_id", "created_at")


@funds.command("list")
@click.option(
    "--status",
    type=click.Choice(["RETURNING", "RETURNED", "FROZEN", "NEEDS_REVIEW"]),
    help="Only these: FROZEN wait for compliance, NEEDS_REVIEW for a person.",
)
@click.option("--escrow-id", help="Only money that named this escrow.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def funds_list(
    ctx: click.Context, status: str | None, escrow_id: str | None, as_json: bool
) -> None:
    """Unmatched funds, newest first (amounts in minor units)."""
    from escrow_stream.db.unmatched import FundsStatus, listing

    wanted = FundsStatus(status) if status else None
    rows = on_database(ctx, lambda pool: listing(pool, status=wanted, escrow_id=escrow_id))
    if as_json:
        echo_rows(rows, "unmatched funds")
        return
    table = [[str(row[c] if row[c] is not None else "-") for c in FUNDS_COLUMNS] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in table)]) for i, c in enumerate(FUNDS_COLUMNS)]
    for line in [list(FUNDS_COLUMNS), *table]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    click.echo(f"{len(rows)} unmatched funds", err=True)


@funds.command("retry")
@click.argument("funds_id")
@click.pass_context
def funds_retry(ctx: click.Context, funds_id: str) -> None:
    """Send FUNDS_ID back to its payer now (NEEDS_REVIEW or RETURNING; the same idempotency
    key as every earlier attempt, so nothing is returned twice).  FROZEN funds are refused."""
    from escrow_stream.clock import utc_now
    from escrow_stream.db.unmatched import RetryRefused, retry_now

    try:
        on_database(ctx, lambda pool: retry_now(pool, funds_id, utc_now()))
    except RetryRefused as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(1)
    click.echo(f"{funds_id}: RETURNING, due now")


def _since(value: str, now: datetime) -> datetime:
    """``--since``: ISO-8601 (no offset = UTC) or a relative ``7d`` / ``36h`` / ``90m``."""

    units = {"d": "days", "h": "hours", "m": "minutes"}
    if value[-1:] in units and value[:-1].isdigit():
        return now - timedelta(**{units[value[-1]]: int(value[:-1])})
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give ISO-8601 (2026-11-30T12:00:00Z) or 7d / 36h / 90m"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@main.command()
@click.option(
    "--providers",
    is_flag=True,
    help="Compare Stripe's and the custodian's objects with our records instead (JSON lines).",
)
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="With --providers: the window, ISO-8601 or relative (7d, 36h, 90m).",
)
@click.pass_context
def reconcile(ctx: click.Context, providers: bool, since: str) -> None:
    """Check the mirrored ledger's invariants (SPEC §7); exit 1 on any violation.

    With --providers: list Stripe's PaymentIntents, Transfers, Refunds and the custodian's
    deposits and transfers, compare them with the ledger, payment effects, deposits and
    unmatched funds of this deployment, and print one JSON line per difference (exit 1), or
    a one-line JSON summary (exit 0).  Exit 2 when a provider or the database cannot be read.
    """
    if providers:
        _reconcile_providers(ctx, since)
        return
    from escrow_stream.db.queries import reconcile as reconcile_mirror

    problems = on_database(ctx, reconcile_mirror)
    for problem in problems:
        click.echo(problem)
    if problems:
        ctx.exit(1)
    click.echo("ledger ok: every posting balances, no holding is negative")


def _reconcile_providers(ctx: click.Context, since_text: str) -> None:
    from escrow_stream.agents.reconcile import reconcile_providers
    from escrow_stream.clock import utc_now
    from escrow_stream.db.pool import Database

    settings = settings_of(ctx)
    since = _since(since_text, utc_now())

    async def run() -> Any:
        database = Database(settings)
        try:
            return await reconcile_providers(settings, database, since)
        finally:
            await database.close()

    try:
        report = asyncio.run(run())
    except Exception as exc:  # a provider or the database did not answer: nothing compared
        click.echo(f"reconcile --providers: {type(exc).__name__}: {exc}", err=True)
        ctx.exit(2)
    summary = json.dumps(report.summary(), sort_keys=True)
    for difference in report.differences:
        click.echo(json.dumps(difference.as_json(), sort_keys=True))
    click.echo(summary, err=True)
    if report.differences:
        ctx.exit(1)
    click.echo(summary)


@main.group()
def outbox() -> None:
    """The outbox of accepted commands."""


@outbox.command("replay")
@click.option("--aggregate", "aggregates", multiple=True, help="Only these escrow ids.")
@click.option("--since", type=click.DateTime(), default=None, help="Only rows created since.")
@click.pass_context
def outbox_replay(ctx: click.Context, aggregates: tuple[str, ...], since: datetime | None) -> None:
    """Send outbox rows again (seed's "Outbox Replay").

    Without a filter: the dead-lettered rows only. With --aggregate and/or --since: also
    rows already published (harmless downstream: a repeated commandId gets its recorded
    outcome).
    """
    from escrow_stream.db.outbox import replay

    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    count = on_database(ctx, lambda pool: replay(pool, list(aggregates) or None, since))
    click.echo(f"{count} outbox row(s) will be sent again")


@main.group()
def idempotency() -> None:
    """Idempotency-Key records (IDEMPOTENCY_TTL_HOURS)."""


@idempotency.command("purge")
@click.pass_context
def idempotency_purge(ctx: click.Context) -> None:
    """Delete the expired Idempotency-Key records; print how many.

    The worker's leader does the same daily (seed: "Records older than TTL are cleaned up
    daily"); this runs it on a schedule of the operator's (a CronJob) or once by hand.
    Redis records expire by themselves; PostgreSQL rows (the store, or the fallback under
    IDEMPOTENCY_STORAGE=redis) are deleted here.
    """
    from escrow_stream.clock import utc_now
    from escrow_stream.db.pool import Database
    from escrow_stream.idempotency import build_idempotency_store
    from escrow_stream.redisconn import redis_client

    settings = settings_of(ctx)

    async def run() -> int:
        database = Database(settings)
        redis = redis_client(settings) if settings.idempotency_storage == "redis" else None
        try:
            store = build_idempotency_store(settings, database, redis)
            return await store.purge_expired(utc_now())
        finally:
            await database.close()
            if redis is not None:
                await redis.aclose()

    click.echo(f"{asyncio.run(run())} expired idempotency record(s) purged")
