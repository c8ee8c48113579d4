"""The ``escrows`` table: escrowId → the escrow snapshot as JSON (SPEC §3 shape).

The table is co-partitioned with ``escrow-commands`` (6 partitions, key = escrowId), so each
escrow's state lives on the worker that owns its commands.  Values are stored as the same
JSON the events carry; keys are JSON strings (Faust's encoding of ``str`` keys).
"""

from __future__ import annotations

from typing import Any

import faust
from faust.types import TableT

from escrow_stream.domain import Escrow

TABLE_NAME = "escrows"
TABLE_HELP = "Escrow state by escrowId: the snapshot after the newest event (SPEC §3)."


def define(app: faust.App, partitions: int) -> TableT[str, Any]:
    return app.Table(
        TABLE_NAME,
        partitions=partitions,
        key_type=str,  # JSON-encoded in the changelog, as Faust stores str keys
        value_type=bytes,  # the snapshot's JSON, encoded once by pydantic (raw codec)
        help=TABLE_HELP,
    )


def dump(escrow: Escrow) -> bytes:
    return escrow.model_dump_json(by_alias=True).encode()


def load(value: bytes | None) -> Escrow | None:
    return None if value is None else Escrow.model_validate_json(value)


def changelog_topic_name(app_id: str) -> str:
    """Faust's name for the table's changelog topic."""
    return f"{app_id}-{TABLE_NAME}-changelog"
