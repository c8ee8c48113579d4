"""The ``escrow-stream`` group and what its commands share: settings, a pool, JSON rows."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from escrow_stream.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")


def settings_of(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


def on_database(ctx: click.Context, query: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``query`` on a pool of its own, closed afterwards."""
    from escrow_stream.db.pool import create_pool

    async def run() -> T:
        pool = await create_pool(settings_of(ctx))
        try:
            return await query(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


def echo_rows(rows: list[dict[str, Any]], counted: str) -> None:
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
