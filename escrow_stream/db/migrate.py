"""Schema migrations with Alembic: upgrade, downgrade and status, driven from the CLI."""

from __future__ import annotations

import io
from pathlib import Path

from alembic import command
from alembic.config import Config

from escrow_stream.config import Settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(database_url: str, output: io.StringIO | None = None) -> Config:
    cfg = Config(stdout=output) if output is not None else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = database_url
    return cfg


def _url(settings: Settings, database_url: str | None) -> str:
    return database_url or settings.migrations_database_url


def upgrade(settings: Settings, revision: str = "head", database_url: str | None = None) -> None:
    command.upgrade(alembic_config(_url(settings, database_url)), revision)


def downgrade(settings: Settings, steps: int = 1, database_url: str | None = None) -> None:
    command.downgrade(alembic_config(_url(settings, database_url)), f"-{steps}")


def downgrade_to(settings: Settings, revision: str, database_url: str | None = None) -> None:
    command.downgrade(alembic_config(_url(settings, database_url)), revision)


def status(settings: Settings, database_url: str | None = None) -> str:
    """The current revision and the head, as Alembic prints them."""
    out = io.StringIO()
    cfg = alembic_config(_url(settings, database_url), out)
    out.write("current: ")
    command.current(cfg)
    out.write("head: ")
    command.heads(cfg)
    return out.getvalue()
