"""KYC status records (``kyc_status``), read by the processor and the gateway when KYC gating
is on, with a bounded cache of VERIFIED users that every worker keeps current through
PostgreSQL ``LISTEN``/``NOTIFY``.

Writing: :meth:`KycDirectory.set_status` upserts the row and ``pg_notify``\\ s the user id on
:data:`CHANNEL` in the same statement, so the notification goes out when (and only if) the
change commits, to every listening worker.

Reading, :meth:`KycDirectory.verified`, in order:

1. Not listening (before :meth:`KycDirectory.listen` has its connection, or after that
   connection dropped): ask PostgreSQL, cache nothing.
2. Listening: users cached as VERIFIED (within ``ttl_s``) are answered from the cache; the
   rest are asked from PostgreSQL.
3. Those found VERIFIED are cached only if no notification arrived and the listener did not
   drop or reconnect while the query ran (the generation is unchanged): an answer read
   before a revocation is never stored after it.

Listening (:meth:`KycDirectory.listen`, one task per worker, until cancelled), in order:

1. Connect a dedicated connection and ``LISTEN``; from then on the cache is used (it starts
   empty).
2. Each notification evicts its user (an empty payload: everyone); every
   ``ping_interval_s`` the connection is asked ``SELECT 1`` (within ``ping_timeout_s``).
3. The connection closing, or a ping failing: stop using the cache at once, empty it,
   close the connection, wait ``retry_s``, and go back to step 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from escrow_stream.db.pool import Database

log = logging.getLogger(__name__)

VERIFIED = "VERIFIED"
#: The notification channel of KYC status changes; the payload is the user id.
CHANNEL = "escrow_kyc_status"
#: A user id longer than this (bytes) is notified as "" (evict everyone): NOTIFY payloads
#: must stay under 8000 bytes.
PAYLOAD_BYTES_MAX = 7900
CACHE_ENTRIES_MAX = 50_000
#: Even while notifications flow, a cached VERIFIED answer is asked again after this long.
CACHE_TTL_S = 300.0
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 5.0
RETRY_S = 1.0

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class KycDirectory:
    def __init__(
        self,
        database: Database,
        *,
        entries_max: int = CACHE_ENTRIES_MAX,
        ttl_s: float = CACHE_TTL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database = database
        self._entries_max = entries_max
        self._ttl_s = ttl_s
        self._monotonic = monotonic
        #: user id → when it was read as VERIFIED (monotonic s), oldest first
        self._cache: OrderedDict[str, float] = OrderedDict()
        #: bumped by every notification, drop and (re)connection of the listener
        self._generation = 0
        self._listening = False
        self._lost = asyncio.Event()

    @property
    def listening(self) -> bool:
        """Whether lookups use the cache (step 1 of :meth:`listen` done, not dropped)."""
        return self._listening

    @property
    def generation(self) -> int:
        """Bumped by every notification, drop and (re)connection of the listener (step 3)."""
        return self._generation

    async def verified(self, user_ids: frozenset[str]) -> frozenset[str]:
        """The subset of ``user_ids`` whose KYC status is VERIFIED (steps 1-3)."""
        if not user_ids:
            return frozenset()
        if not self._listening:
            return await self._query(user_ids)
        now = self._monotonic()
        hits = {u for u in user_ids if self._fresh(u, now)}
        if len(hits) == len(user_ids):
            return frozenset(hits)
        generation = self._generation
        found = await self._query(user_ids - hits)
        if self._listening and self._generation == generation:
            for user_id in found:
                self._cache[user_id] = now
                self._cache.move_to_end(user_id)
            while len(self._cache) > self._entries_max:
                self._cache.popitem(last=False)
        return found | hits

    def _fresh(self, user_id: str, now: float) -> bool:
        read_at = self._cache.get(user_id)
        if read_at is None:
            return False
        if now - read_at >= self._ttl_s:
            del self._cache[user_id]
            return False
        return True

    async def _query(self, user_ids: frozenset[str]) -> frozenset[str]:
        pool = await self._database.pool()
        rows = await pool.fetch(
            "SELECT user_id FROM kyc_status WHERE user_id = ANY($1::text[]) AND status = $2",
            list(user_ids),
            VERIFIED,
        )
        return frozenset(r["user_id"] for r in rows)

    async def status(self, user_id: str) -> str | None:
        pool = await self._database.pool()
        value: str | None = await pool.fetchval(
            "SELECT status FROM kyc_status WHERE user_id = $1", user_id
        )
        return value

    async def set_status(self, user_id: str, status: str, updated_by: str) -> None:
        """Upsert the status and notify every worker's directory, in one statement."""
        pool = await self._database.pool()
        await pool.execute(
            """
            WITH upserted AS (
                INSERT INTO kyc_status (user_id, status, updated_by, updated_at)
                VALUES ($1, $2, $3, now())
                ON CONFLICT (user_id) DO UPDATE
                   SET status = EXCLUDED.status, updated_by = EXCLUDED.updated_by,
                       updated_at = now()
                RETURNING user_id
            )
            SELECT pg_notify(
                $4,
                CASE WHEN octet_length(user_id) <= $5 THEN user_id ELSE '' END
            ) FROM upserted
            """,
            user_id,
            status,
            updated_by,
            CHANNEL,
            PAYLOAD_BYTES_MAX,
        )
        self._evict(user_id)  # this worker's next lookup, whatever the notification's delay

    def _evict(self, user_id: str) -> None:
        self._generation += 1
        if user_id and len(user_id.encode()) <= PAYLOAD_BYTES_MAX:
            self._cache.pop(user_id, None)
        else:
            self._cache.clear()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._evict(payload)

    def _on_lost(self, conn: Any) -> None:
        self._stop_caching()
        self._lost.set()

    def _stop_caching(self) -> None:
        self._listening = False
        self._generation += 1
        self._cache.clear()

    async def listen(
        self,
        connect: Connect,
        *,
        ping_interval_s: float = PING_INTERVAL_S,
        ping_timeout_s: float = PING_TIMEOUT_S,
        retry_s: float = RETRY_S,
    ) -> None:
        """Steps 1-3 of listening, until cancelled (the cache is off from then on)."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect()
                self._lost.clear()
                conn.add_termination_listener(self._on_lost)
                await conn.add_listener(CHANNEL, self._on_notification)
                self._cache.clear()
                self._generation += 1
                self._listening = True
                log.info("kyc: listening for status changes; cache on")
                while not self._lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._lost.wait(), ping_interval_s)
                    if not self._lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=ping_timeout_s)
                log.warning("kyc: status listener connection closed; cache off, reconnecting")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("kyc: status listener down (%r); cache off, reconnecting", exc)
            finally:
                self._stop_caching()
                if conn is not None:
                    conn.remove_termination_listener(self._on_lost)
                    conn.terminate()
            await asyncio.sleep(retry_s)  # a pause before reconnecting, not a synchronisation
