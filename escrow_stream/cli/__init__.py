"""The ``escrow-stream`` command: configuration, topics, schemas, migrations, offsets, the
worker and the operators' runbooks, one module per kind of work."""

from escrow_stream.cli import infra, operations, run
from escrow_stream.cli._base import main

__all__ = ["infra", "main", "operations", "run"]
