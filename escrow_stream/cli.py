"""The ``escrow-stream`` command: configuration, topics, schemas and the worker."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from escrow_stream.config import ConfigError, Settings, dump_json, load_settings

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


def _on_database(ctx: click.Context, query: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``query`` on a pool of its own, closed afterwards."""
    from escrow_stream.db.pool import create_pool

    async def run() -> T:
        pool = await create_pool(_settings(ctx))
        try:
            return await query(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


def _echo_rows(rows: list[dict[str, Any]], counted: str) -> None:
    """One JSON line per row on stdout, the count on stderr."""
    for row in rows:
        click.echo(json.dumps(row, default=str, sort_keys=True))
    click.echo(f"{len(rows)} {counted}", err=True)


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """escrow-stream: escrow for marketplaces on Kafka."""
    try:
        ctx.obj = load_settings(os.environ)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(1)


@main.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command("show")
@click.option("--reveal", is_flag=True, help="Print secrets in clear text.")
@click.pass_context
def config_show(ctx: click.Context, reveal: bool) -> None:
    """Print the effective configuration as JSON keyed by variable name."""
    click.echo(dump_json(_settings(ctx), reveal=reveal))


@main.group()
def topics() -> None:
    """Create and verify the Kafka topics."""


@topics.command("create")
@click.pass_context
def topics_create(ctx: click.Context) -> None:
    """Create the topics that are missing (idempotent)."""
    from escrow_stream.topics import create_topics

    for line in asyncio.run(create_topics(_settings(ctx))):
        click.echo(line)


@topics.command("verify")
@click.pass_context
def topics_verify(ctx: click.Context) -> None:
    """Compare the broker's topics with the definitions; non-zero exit on any difference."""
    from escrow_stream.topics import verify_topics

    problems = asyncio.run(verify_topics(_settings(ctx)))
    for line in problems:
        click.echo(line)
    if problems:
        ctx.exit(1)
    click.echo("topics ok")


@main.group()
def schema() -> None:
    """JSON Schemas of the Kafka messages."""


@schema.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schema_export(directory: Path) -> None:
    """Write one JSON Schema file per message kind into DIRECTORY."""
    from escrow_stream.domain import json_schemas

    directory.mkdir(parents=True, exist_ok=True)
    for name, document in sorted(json_schemas().items()):
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        click.echo(str(path))


@main.group()
def db() -> None:
    """PostgreSQL schema migrations."""


@db.command("migrate")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_migrate(ctx: click.Context, revision: str) -> None:
    """Apply migrations up to REVISION."""
    from escrow_stream.db import migrate

    migrate.upgrade(_settings(ctx), revision)
    click.echo(migrate.status(_settings(ctx)), nl=False)


@db.command("rollback")
@click.option("--steps", default=1, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def db_rollback(ctx: click.Context, steps: int) -> None:
    """Revert the newest STEPS migrations (drops their tables: back up first)."""
    from escrow_stream.db import migrate

    migrate.downgrade(_settings(ctx), steps)
    click.echo(migrate.status(_settings(ctx)), nl=False)


@db.command("status")
@click.pass_context
def db_status(ctx: click.Context) -> None:
    """Print the applied revision and the newest one."""
    from escrow_stream.db import migrate

    click.echo(migrate.status(_settings(ctx)), nl=False)


@main.group()
def offsets() -> None:
    """Consumer offsets of the worker group (runbook: reprocess commands)."""


@offsets.command("reset")
@click.option("--topic", default=None, help="Default: KAFKA_COMMANDS_TOPIC.")
@click.option("--group", "group_id", default=None, help="Default: KAFKA_GROUP_ID.")
@click.option(
    "--to-datetime",
    "to",
    type=click.DateTime(
        formats=[
            "%Y-%m-%dT%H:%M:%S%z",
            "%Y-%m-%dT%H:%M:%S.%f%z",
            "%Y-%m-%dT%H:%M:%SZ",
            "%Y-%m-%dT%H:%M:%S.%fZ",
        ]
    ),
    default=None,
)
@click.option("--to-earliest", is_flag=True)
@click.option("--execute", is_flag=True, help="Commit the new offsets (otherwise only print).")
@click.pass_context
def offsets_reset(
    ctx: click.Context,
    topic: str | None,
    group_id: str | None,
    to: datetime | None,
    to_earliest: bool,
    execute: bool,
) -> None:
    """Move the group's offsets back so commands are read again (duplicates are harmless)."""
    from escrow_stream import runbooks

    if (to is None) == (not to_earliest):
        raise click.UsageError("give exactly one of --to-datetime or --to-earliest")
    settings = _settings(ctx)
    topic = topic or settings.kafka_commands_topic
    group_id = group_id or settings.kafka_group_id
    if to is not None and to.tzinfo is None:
        to = to.replace(tzinfo=UTC)
    changes = asyncio.run(runbooks.plan_reset(settings, group_id, topic, to))
    for change in changes:
        click.echo(f"{topic}[{change.partition}]: {change.current} -> {change.new}")
    if not execute:
        click.echo("dry run: add --execute to commit these offsets")
        return
    try:
        asyncio.run(runbooks.execute_reset(settings, group_id, topic, changes))
    except runbooks.GroupActive as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"offsets of group {group_id} on {topic} reset")


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

    settings = _settings(ctx)
    rows = _on_database(
        ctx,
        lambda pool: stuck_escrows(
            pool,
            utc_now(),
            hold_warn_days=settings.stripe_hold_warn_days,
            hold_max_days=settings.stripe_max_hold_days,
        ),
    )
    _echo_rows(rows, "stuck escrow(s)")


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
    _echo_rows(_on_database(ctx, lambda pool: listing(pool, wanted, escrow_id)), "deposit(s)")


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
    rows = _on_database(ctx, lambda pool: listing(pool, status=wanted, escrow_id=escrow_id))
    if as_json:
        _echo_rows(rows, "unmatched funds")
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
        _on_database(ctx, lambda pool: retry_now(pool, funds_id, utc_now()))
    except RetryRefused as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(1)
    click.echo(f"{funds_id}: RETURNING, due now")


def _since(value: str, now: datetime) -> datetime:
    """``--since``: ISO-8601 (no offset = UTC) or a relative ``7d`` / ``36h`` / ``90m``."""
    from datetime import timedelta

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

    problems = _on_database(ctx, reconcile_mirror)
    for problem in problems:
        click.echo(problem)
    if problems:
        ctx.exit(1)
    click.echo("ledger ok: every posting balances, no holding is negative")


def _reconcile_providers(ctx: click.Context, since_text: str) -> None:
    from escrow_stream.agents.reconcile import reconcile_providers
    from escrow_stream.clock import utc_now
    from escrow_stream.db.pool import Database

    settings = _settings(ctx)
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


@main.command("dev-token")
@click.option("--sub", required=True, help="The user or service id.")
@click.option("--role", type=click.Choice(["user", "admin", "service"]), default="user")
@click.option("--ttl-minutes", type=click.IntRange(1, 24 * 60), default=60, show_default=True)
@click.pass_context
def dev_token(ctx: click.Context, sub: str, role: str, ttl_minutes: int) -> None:
    """Print a JWT signed with JWT_SECRET, for development (refused in production)."""
    from datetime import timedelta

    from escrow_stream.clock import utc_now
    from escrow_stream.web.auth import Role, issue_token

    settings = _settings(ctx)
    if settings.is_production:
        raise click.ClickException("dev-token is not available with NODE_ENV=production")
    secret = settings.jwt_secret.get_secret_value()
    click.echo(issue_token(secret, sub, Role(role), utc_now(), timedelta(minutes=ttl_minutes)))


@main.command("outbox-publisher")
@click.pass_context
def outbox_publisher(ctx: click.Context) -> None:
    """Relay the outbox to Kafka without a worker (the seed's separate deployment)."""
    import logging

    from escrow_stream.agents.outbox import run_standalone

    settings = _settings(ctx)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run_standalone(settings))


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
    count = _on_database(ctx, lambda pool: replay(pool, list(aggregates) or None, since))
    click.echo(f"{count} outbox row(s) will be sent again")


@main.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start the Faust worker (agents, tables, web server on PORT)."""
    settings = _settings(ctx)
    if settings.uses_dev_jwt_secret:
        click.echo(
            "escrow-stream: using the DEVELOPMENT JWT secret (not for production); "
            "set JWT_SECRET to a random 64+ character string",
            err=True,
        )
    from faust import Worker

    from escrow_stream.app import app
    from escrow_stream.logs import json_logging_config

    logging_config = (
        json_logging_config(settings.log_level) if settings.log_format == "json" else None
    )
    Worker(
        app, loglevel=settings.log_level.upper(), logging_config=logging_config
    ).execute_from_commandline()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
