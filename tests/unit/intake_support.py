"""In-memory fakes for the intake's adapters: units of work holding an outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from escrow_stream.db.unit_of_work import AfterCommit
from escrow_stream.domain import Command


class MemoryUnitOfWork:
    """Stages outbox rows and after-commit actions until :class:`MemoryUnits` commits."""

    def __init__(self, fail_with: Exception | None) -> None:
        self.rows: list[tuple[str, Command]] = []
        self.actions: list[AfterCommit] = []
        self._fail_with = fail_with

    @property
    def connection(self) -> asyncpg.Connection:
        raise AssertionError("an in-memory unit of work has no database connection")

    async def enqueue_command(self, topic: str, command: Command, secret: str) -> None:
        if self._fail_with is not None:
            raise self._fail_with
        self.rows.append((topic, command))

    def after_commit(self, action: AfterCommit) -> None:
        self.actions.append(action)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Rows written inside are dropped if it raises (a PostgreSQL SAVEPOINT's rollback)."""
        kept = len(self.rows)
        try:
            yield None
        except BaseException:
            del self.rows[kept:]
            raise


class MemoryUnits:
    """Units over one in-memory outbox: a unit whose block raises leaves no trace;
    ``fail_with`` makes every outbox write raise (Kafka's outbox table unavailable)."""

    def __init__(self) -> None:
        self.outbox: list[tuple[str, Command]] = []
        self.commits = 0
        self.fail_with: Exception | None = None

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[MemoryUnitOfWork]:
        unit = MemoryUnitOfWork(self.fail_with)
        yield unit
        self.outbox.extend(unit.rows)
        self.commits += 1
        for action in unit.actions:
            await action()
