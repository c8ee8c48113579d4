"""The process's one Redis client, set to fail fast: a Redis that is down or hangs must not
hold requests up (rate limits fail open; idempotency falls back to the database)."""

from __future__ import annotations

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from escrow_stream.config import Settings

CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 2.0
#: One immediate retry rides out a dropped connection; redis-py's default is ten, with backoff.
RETRIES = 1


def redis_client(settings: Settings) -> redis.asyncio.Redis | None:
    """The client for ``REDIS_URL`` (connects on first use), or None when it is unset."""
    if settings.redis_url is None:
        return None
    return redis.asyncio.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S,
        retry=Retry(NoBackoff(), RETRIES),
    )
