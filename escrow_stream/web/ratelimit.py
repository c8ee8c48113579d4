"""Fixed-window rate limits (seed: 100 requests/min per IP, 50/min per user on escrow
endpoints), shared across replicas through Redis when ``REDIS_URL`` is set, else per process.

A request is counted in the window ``floor(now / 60 s)``; over the limit it gets 429 with
``Retry-After`` = seconds until the window ends.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Protocol

import redis.asyncio

from escrow_stream.web.problems import Problem

log = logging.getLogger(__name__)

WINDOW_S = 60
MEMORY_KEYS_MAX = 100_000


class Counter(Protocol):
    async def hit(self, key: str, window: int) -> int:
        """Count one request for ``key`` in ``window``; the count so far."""
        ...


class MemoryCounter:
    """Per-process counts; old windows are dropped as new ones start (bounded)."""

    def __init__(self) -> None:
        self._window = -1
        self._counts: dict[str, int] = {}

    async def hit(self, key: str, window: int) -> int:
        if window != self._window:
            self._window, self._counts = window, {}
        if len(self._counts) >= MEMORY_KEYS_MAX and key not in self._counts:
            return 0  # under a flood of distinct keys, fail open rather than grow without bound
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._counts[key]


class RedisCounter:
    """Shared counts: INCR and EXPIRE in one pipeline per request.

    Redis being down must not take the API down with it: the limit then fails open (the
    request is allowed and a warning logged), and ``/ready`` reports Redis as failing.
    """

    def __init__(self, client: redis.asyncio.Redis, namespace: str) -> None:
        self._redis = client
        self._namespace = namespace  # the app id: replicas of one deployment share counts

    async def hit(self, key: str, window: int) -> int:
        name = f"ratelimit:{self._namespace}:{window}:{key}"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(name)
                pipe.expire(name, WINDOW_S * 2)
                count, _ = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("rate limit not enforced, Redis unavailable: %s", exc)
            return 0
        return int(count)


class RateLimiter:
    def __init__(self, counter: Counter, per_ip: int, per_user: int) -> None:
        self._counter = counter
        self.per_ip = per_ip
        self.per_user = per_user

    async def check(self, kind: str, who: str, limit: int, now: datetime) -> None:
        stamp = now.timestamp()
        window = math.floor(stamp / WINDOW_S)
        if await self._counter.hit(f"{kind}:{who}", window) > limit:
            retry_after = max(1, math.ceil((window + 1) * WINDOW_S - stamp))
            raise Problem(
                429,
                "RATE_LIMITED",
                f"more than {limit} requests per minute for this {kind}",
                headers={"Retry-After": str(retry_after)},
            )

    async def check_ip(self, ip: str, now: datetime) -> None:
        await self.check("ip", ip, self.per_ip, now)

    async def check_user(self, user_id: str, now: datetime) -> None:
        await self.check("user", user_id, self.per_user, now)
