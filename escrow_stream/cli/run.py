"""Running: the worker, the standalone outbox publisher, development tokens."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import click

from escrow_stream.cli._base import main, settings_of


@main.command("dev-token")
@click.option("--sub", required=True, help="The user or service id.")
@click.option("--role", type=click.Choice(["user", "admin", "service"]), default="user")
@click.option("--ttl-minutes", type=click.IntRange(1, 24 * 60), default=60, show_default=True)
@click.pass_context
def dev_token(ctx: click.Context, sub: str, role: str, ttl_minutes: int) -> None:
    """Print a JWT signed with JWT_SECRET, for development (refused in production)."""

    from escrow_stream.clock import utc_now
    from escrow_stream.web.auth import Role, issue_token

    settings = settings_of(ctx)
    if settings.is_production:
        raise click.ClickException("dev-token is not available with NODE_ENV=production")
    secret = settings.jwt_secret.get_secret_value()
    click.echo(issue_token(secret, sub, Role(role), utc_now(), timedelta(minutes=ttl_minutes)))


@main.command("outbox-publisher")
@click.pass_context
def outbox_publisher(ctx: click.Context) -> None:
    """Relay the outbox to Kafka without a worker (the seed's separate deployment)."""
    import logging

    from escrow_stream.agents.relay import run_standalone
    from escrow_stream.sentry import init_sentry, instrument_event_loop

    settings = settings_of(ctx)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    init_sentry(settings, "outbox-publisher")

    async def publish() -> None:
        instrument_event_loop()
        await run_standalone(settings)

    asyncio.run(publish())


@main.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start the Faust worker (agents, tables, web server on PORT)."""
    settings = settings_of(ctx)
    if settings.uses_dev_jwt_secret:
        click.echo(
            "escrow-stream: using the DEVELOPMENT JWT secret (not for production); "
            "set JWT_SECRET to a random 64+ character string",
            err=True,
        )
    from faust import Worker as FaustWorker

    from escrow_stream.sentry import init_sentry, instrument_event_loop

    # before the app is built, so that its web server and logs are instrumented
    init_sentry(settings, "worker")

    from escrow_stream.app import app
    from escrow_stream.logs import json_logging_config

    class Worker(FaustWorker):  # the name Faust's log lines show: [^Worker]
        async def on_first_start(self) -> None:
            instrument_event_loop()  # the loop runs from here on
            await super().on_first_start()

    logging_config = (
        json_logging_config(settings.log_level) if settings.log_format == "json" else None
    )
    Worker(
        app, loglevel=settings.log_level.upper(), logging_config=logging_config
    ).execute_from_commandline()
