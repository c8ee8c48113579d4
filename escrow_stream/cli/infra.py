"""Setting up: configuration, topics, JSON Schemas, migrations, consumer offsets."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import click

from escrow_stream.cli._base import main, settings_of
from escrow_stream.config import dump_json


@main.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command("show")
@click.option("--reveal", is_flag=True, help="Print secrets in clear text.")
@click.pass_context
def config_show(ctx: click.Context, reveal: bool) -> None:
    """Print the effective configuration as JSON keyed by variable name."""
    click.echo(dump_json(settings_of(ctx), reveal=reveal))


@main.group()
def topics() -> None:
    """Create and verify the Kafka topics."""


@topics.command("create")
@click.pass_context
def topics_create(ctx: click.Context) -> None:
    """Create the topics that are missing (idempotent); refused, with nothing created, when
    the replication factor is larger than the cluster's broker count."""
    from escrow_stream.topics import ReplicationFactorTooLarge, create_topics

    try:
        report = asyncio.run(create_topics(settings_of(ctx)))
    except ReplicationFactorTooLarge as exc:
        click.echo(str(exc), err=True)
        ctx.exit(1)
    for line in report:
        click.echo(line)


@topics.command("verify")
@click.pass_context
def topics_verify(ctx: click.Context) -> None:
    """Compare the broker's topics with the definitions; non-zero exit on any difference."""
    from escrow_stream.topics import verify_topics

    problems = asyncio.run(verify_topics(settings_of(ctx)))
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

    migrate.upgrade(settings_of(ctx), revision)
    click.echo(migrate.status(settings_of(ctx)), nl=False)


@db.command("rollback")
@click.option("--steps", default=1, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def db_rollback(ctx: click.Context, steps: int) -> None:
    """Revert the newest STEPS migrations (drops their tables: back up first)."""
    from escrow_stream.db import migrate

    migrate.downgrade(settings_of(ctx), steps)
    click.echo(migrate.status(settings_of(ctx)), nl=False)


@db.command("status")
@click.pass_context
def db_status(ctx: click.Context) -> None:
    """Print the applied revision and the newest one."""
    from escrow_stream.db import migrate

    click.echo(migrate.status(settings_of(ctx)), nl=False)


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
    settings = settings_of(ctx)
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
