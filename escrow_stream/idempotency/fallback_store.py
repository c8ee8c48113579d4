"""``IDEMPOTENCY_STORAGE=redis``: Redis, and the database store while Redis is unreachable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

import redis.exceptions

from escrow_stream.db.unit_of_work import UnitOfWork
from escrow_stream.idempotency.protocol import Begin, BeginKind, IdempotencyStore
from escrow_stream.metrics import IDEMPOTENCY_FALLBACKS

log = logging.getLogger("escrow_stream.idempotency")  # one logger for every store

#: Once Redis failed, the fallback store asks it again only after this long.
PRIMARY_RETRY_AFTER_S = 5.0
#: What "Redis cannot be reached" looks like to the fallback store.
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class FallbackIdempotencyStore:
    """``IDEMPOTENCY_STORAGE=redis`` as the seed asks: Redis, and the database store for
    every request that begins while Redis cannot be reached.

    A request stays with the store its ``begin`` used (complete / abandon go there too).
    While Redis is down, a key begun in Redis earlier is unknown to the database: a retry
    then gets NEW, and because the gateway derives the commandId from user + key it
    enqueues the *same* command, which the processor applies once (SPEC §3, rule 1) — the
    same argument as for a lapsed lease.  The answer is the same 202 body.
    """

    def __init__(
        self,
        primary: IdempotencyStore,
        fallback: IdempotencyStore,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._monotonic = monotonic
        #: Redis is not asked again before this (monotonic seconds) once it failed
        self._primary_down_until = 0.0
        #: (user, key) of requests begun (NEW) in the fallback and not yet finished
        self._in_fallback: set[tuple[str, str]] = set()

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        if self._monotonic() >= self._primary_down_until:
            try:
                return await self._primary.begin(user_id, key, request_hash, now)
            except UNREACHABLE as exc:
                self._primary_down_until = self._monotonic() + PRIMARY_RETRY_AFTER_S
                log.warning("idempotency: Redis unavailable (%r); using the database", exc)
        IDEMPOTENCY_FALLBACKS.inc()
        begun = await self._fallback.begin(user_id, key, request_hash, now)
        if begun.kind is BeginKind.NEW:
            self._in_fallback.add((user_id, key))
        return begun

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        if (user_id, key) in self._in_fallback:
            self._in_fallback.discard((user_id, key))
            await self._fallback.complete(user_id, key, status, body)
            return
        try:
            await self._primary.complete(user_id, key, status, body)
        except UNREACHABLE as exc:  # the command is enqueued; its reservation just lapses
            log.warning("idempotency: could not complete in Redis (%r)", exc)

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """A key begun in the database completes in the unit's transaction; one begun in
        Redis after the commit, through :meth:`complete` (which tolerates Redis failing)."""
        if (user_id, key) not in self._in_fallback:
            unit.after_commit(partial(self.complete, user_id, key, status, body))
            return
        await self._fallback.complete_in(unit, user_id, key, status, body)

        async def finished() -> None:  # only once committed: a rollback still abandons here
            self._in_fallback.discard((user_id, key))

        unit.after_commit(finished)

    async def abandon(self, user_id: str, key: str) -> None:
        if (user_id, key) in self._in_fallback:
            self._in_fallback.discard((user_id, key))
            await self._fallback.abandon(user_id, key)
            return
        try:
            await self._primary.abandon(user_id, key)
        except UNREACHABLE as exc:
            log.warning("idempotency: could not abandon in Redis (%r)", exc)

    async def purge_expired(self, now: datetime) -> int:
        return await self._fallback.purge_expired(now)  # Redis expires its keys itself
