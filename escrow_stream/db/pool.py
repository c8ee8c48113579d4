"""The asyncpg connection pool, sized and timed from the configuration."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from escrow_stream.config import Settings
from escrow_stream.metrics import unwatch_pool, watch_pool


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(settings: Settings, dsn: str | None = None) -> asyncpg.Pool:
    """A pool of ``DATABASE_POOL_SIZE`` connections; acquire waits ``DATABASE_POOL_TIMEOUT``."""
    pool = await asyncpg.create_pool(
        dsn or settings.database_url.get_secret_value(),
        min_size=1,
        max_size=settings.database_pool_size,
        timeout=settings.database_pool_timeout_ms / 1000,
        max_inactive_connection_lifetime=30.0,  # the seed's idle timeout
        init=_init_connection,
    )
    assert pool is not None
    return pool


class Database:
    """A pool created on first use and closed with the app (one per process); its
    connections in use are reported when ``/metrics`` is scraped (``escrow_db_pool_*``)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await create_pool(self._settings)
                    watch_pool(self._pool)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            unwatch_pool(self._pool)
            self._pool = None
