"""One unit of work: writes that commit together in one PostgreSQL transaction, then what
must follow the commit.

Protocol, in order:

1. ``async with units.begin() as unit``: one transaction on one pooled connection.
2. Write in it: ``unit.enqueue_command`` (an ``outbox`` row, SPEC §4 Outbox), and whatever
   else joins the unit — a database adapter writes on ``unit.connection``; an adapter outside
   PostgreSQL (Redis) registers ``unit.after_commit(action)`` instead.
   ``unit.savepoint()`` fences writes that may fail on their own without undoing the rest.
3. Leaving the block commits, and only then the after-commit actions run, in order, on no
   connection; an error in one propagates (what committed stays committed).  If the block
   raises, the transaction rolls back and no after-commit action runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import asyncpg

from escrow_stream.db import outbox
from escrow_stream.db.pool import Database
from escrow_stream.domain import Command

AfterCommit = Callable[[], Awaitable[None]]


class UnitOfWork(Protocol):
    """Step 2's handle on one open unit."""

    @property
    def connection(self) -> asyncpg.Connection:
        """The transaction's connection (database adapters write on it)."""
        ...

    async def enqueue_command(self, topic: str, command: Command, secret: str) -> None:
        """The command's ``outbox`` row (``db.outbox.enqueue_command``)."""
        ...

    def after_commit(self, action: AfterCommit) -> None:
        """Run ``action`` once this unit has committed (step 3), never if it rolls back."""
        ...

    def savepoint(self) -> AbstractAsyncContextManager[object]:
        """A part of the unit that a failure inside it undoes alone (the rest of the unit
        goes on): a PostgreSQL SAVEPOINT."""
        ...


class UnitsOfWork(Protocol):
    """Step 1: where units come from."""

    def begin(self) -> AbstractAsyncContextManager[UnitOfWork]: ...


class PostgresUnitOfWork:
    """A unit on one asyncpg connection inside ``conn.transaction()``."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection
        self._after_commit: list[AfterCommit] = []

    @property
    def connection(self) -> asyncpg.Connection:
        return self._connection

    async def enqueue_command(self, topic: str, command: Command, secret: str) -> None:
        await outbox.enqueue_command(self._connection, topic, command, secret)

    def after_commit(self, action: AfterCommit) -> None:
        self._after_commit.append(action)

    def savepoint(self) -> AbstractAsyncContextManager[object]:
        savepoint: AbstractAsyncContextManager[object] = self._connection.transaction()
        return savepoint  # nested in the unit's transaction: a SAVEPOINT

    async def committed(self) -> None:
        """Step 3, called by :class:`PostgresUnits` after the commit."""
        for action in self._after_commit:
            await action()


class PostgresUnits:
    """Units of work on the application's pool (``db.pool.Database``)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[PostgresUnitOfWork]:
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            unit = PostgresUnitOfWork(conn)
            yield unit
        await unit.committed()
