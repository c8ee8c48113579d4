"""Faust app commands for operators: ``faust -A escrow_stream.app escrow-get|escrow-list``.

They read the ``escrows`` table's changelog topic from the beginning to its end
(:func:`escrow_stream.runbooks.read_table_from_changelog`), so they work without a running
worker and see exactly what a recovering worker would restore.
"""

from __future__ import annotations

import json
from typing import Any

import faust
from faust.cli import argument, option

from escrow_stream import app as composition
from escrow_stream.config import Settings
from escrow_stream.runbooks import read_table_from_changelog

# built here, on first use: the Faust CLI asked for the app
app: faust.App = composition.app
settings: Settings = composition.settings


@app.command(argument("escrow_id"))
async def escrow_get(self: Any, escrow_id: str) -> None:
    """Print one escrow as JSON (from the table's changelog); exit 1 when unknown."""
    state = await read_table_from_changelog(settings, app.conf.id)
    if escrow_id not in state:
        raise self.UsageError(f"escrow {escrow_id} not found in the table")
    self.say(json.dumps(state[escrow_id], indent=2, sort_keys=True))


@app.command(option("--status", "status", default=None, help="Only escrows in this status."))
async def escrow_list(self: Any, status: str | None) -> None:
    """Print the escrows as JSON lines (from the table's changelog)."""
    state = await read_table_from_changelog(settings, app.conf.id)
    for escrow_id in sorted(state):
        value = state[escrow_id]
        if status is None or value.get("status") == status:
            self.say(json.dumps(value, sort_keys=True))
