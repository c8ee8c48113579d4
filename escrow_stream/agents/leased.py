"""Leased work: rows a worker claims from PostgreSQL and performs, each in a task of its own.

The payments agent's effects and the unmatched-funds returns run the same way: a task in every
worker, woken when new work is recorded (:meth:`LeasedWork.wake`) and otherwise every
``poll_s``, claims what is due and has room for (the claim leases the rows: other workers skip
them until the lease runs out), and performs each in its own task, so one slow provider call
holds back nothing else.  A task that fails unexpectedly (the database is down, say) is
logged: its lease runs out and the row is due again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LeasedWork(Generic[T]):
    def __init__(
        self,
        what: str,
        claim: Callable[[int], Awaitable[list[T]]],
        perform: Callable[[T], Awaitable[None]],
        name_of: Callable[[T], str],
        in_flight_max: int,
    ) -> None:
        self._what = what
        self._claim = claim
        self._perform = perform
        self._name_of = name_of
        self._in_flight_max = in_flight_max
        self._in_flight: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()

    async def run_due(self) -> int:
        """Claim the due rows there is room for and start each in its own task."""
        claimed = await self._claim(self._in_flight_max - len(self._in_flight))
        for item in claimed:
            task = asyncio.create_task(self._perform_logged(item))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(claimed)

    async def drain(self) -> None:
        """Wait for the work in flight (tests, shutdown)."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    async def run_forever(self, stopping: Callable[[], bool], poll_s: float) -> None:
        while not stopping():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), poll_s)
            self.wake.clear()
            try:
                await self.run_due()
            except Exception:  # the database is down, say: the next round tries again
                log.exception("%s runner failed; retrying", self._what)

    async def _perform_logged(self, item: T) -> None:
        try:
            await self._perform(item)
        except Exception:  # the lease runs out: it is due again
            log.exception(
                "%s %s not recorded; due again after its lease", self._what, self._name_of(item)
            )
