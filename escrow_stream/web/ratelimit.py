"""Fixed-window rate limits (seed: 100 requests/min per IP, 50/min per user on escrow
endpoints), shared across replicas through Redis when ``REDIS_URL`` is set, else per process.

A request is counted in the window ``floor(now / 60 s)``; over the limit it gets 429 with
``Retry-After`` = seconds until the window ends.  The per-IP count comes first: a request
refused for its IP is not counted for its user.

One request, one call to the counter (one Redis round trip), in order:

1. The middleware (``web.middleware.make_middleware``): on a path whose view authenticates
   through the gateway first (:func:`counts_user`: ``/api/…`` but the webhooks), the per-IP
   count is left to step 2 (:class:`DeferredIp`, in the request); on any other path it is
   made now, alone (:meth:`RateLimiter.check_ip`; 429 before the view runs).
2. ``Gateway.principal`` authenticates the caller and makes both counts in one call
   (:meth:`RateLimiter.check_ip_and_user`); a caller that fails to authenticate is counted
   for its IP alone (a 429 for the IP wins over the 401).
3. Should a view on such a path answer without step 2 (a 405), the middleware makes the
   count after it (:meth:`RateLimiter.count_ip_late`), so that every request counts once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import redis.asyncio
from aiohttp import web

from escrow_stream.web.problems import Problem

log = logging.getLogger(__name__)

WINDOW_S = 60
MEMORY_KEYS_MAX = 100_000


class Counter(Protocol):
    async def hit(self, keys: Sequence[str], limits: Sequence[int], window: int) -> list[int]:
        """Count one request for each of ``keys`` in ``window``, in order, stopping after
        the first whose count exceeds its limit; the counts so far (0 for a key not counted,
        and for every key when the counts are unavailable: the limits fail open)."""
        ...


class MemoryCounter:
    """Per-process counts; old windows are dropped as new ones start (bounded)."""

    def __init__(self) -> None:
        self._window = -1
        self._counts: dict[str, int] = {}

    async def hit(self, keys: Sequence[str], limits: Sequence[int], window: int) -> list[int]:
        if window != self._window:
            self._window, self._counts = window, {}
        counts = [0] * len(keys)
        for i, (key, limit) in enumerate(zip(keys, limits, strict=True)):
            if len(self._counts) >= MEMORY_KEYS_MAX and key not in self._counts:
                continue  # under a flood of distinct keys, fail open rather than grow unbounded
            self._counts[key] = counts[i] = self._counts.get(key, 0) + 1
            if counts[i] > limit:
                break
        return counts


#: KEYS: the counters, in order; ARGV[1]: their time to live (s), ARGV[1 + i]: KEYS[i]'s limit.
HIT_SCRIPT = """
local counts = {}
for i, key in ipairs(KEYS) do
  counts[i] = redis.call('INCR', key)
  redis.call('EXPIRE', key, ARGV[1])
  if counts[i] > tonumber(ARGV[i + 1]) then break end
end
return counts
"""


class RedisCounter:
    """Shared counts: every key of a request in one Lua script (``EVALSHA``, one round trip).

    Redis being down must not take the API down with it: the limit then fails open (the
    request is allowed and a warning logged), and ``/ready`` reports Redis as failing.
    """

    def __init__(self, client: redis.asyncio.Redis, namespace: str) -> None:
        self._namespace = namespace  # the app id: replicas of one deployment share counts
        self._script = client.register_script(HIT_SCRIPT)

    async def hit(self, keys: Sequence[str], limits: Sequence[int], window: int) -> list[int]:
        names = [f"ratelimit:{self._namespace}:{window}:{key}" for key in keys]
        try:
            counts = await self._script(keys=names, args=[WINDOW_S * 2, *limits])
        except (redis.RedisError, OSError) as exc:
            log.warning("rate limit not enforced, Redis unavailable: %s", exc)
            return [0] * len(keys)
        return [int(c) for c in counts] + [0] * (len(keys) - len(counts))


@dataclass(frozen=True)
class DeferredIp:
    """A per-IP count left by step 1 for step 2 (or 3)."""

    ip: str
    now: datetime


#: Key in the aiohttp request of a per-IP count that waits for the per-user one (step 1).
DEFERRED_IP_KEY = web.RequestKey("escrow_deferred_ip", DeferredIp)


class RateLimiter:
    def __init__(self, counter: Counter, per_ip: int, per_user: int) -> None:
        self._counter = counter
        self.per_ip = per_ip
        self.per_user = per_user

    async def check_many(self, checks: Sequence[tuple[str, str, int]], now: datetime) -> None:
        """Count ``(kind, who, limit)`` in order in one call; 429 for the first one over."""
        stamp = now.timestamp()
        window = math.floor(stamp / WINDOW_S)
        keys = [f"{kind}:{who}" for kind, who, _ in checks]
        counts = await self._counter.hit(keys, [limit for _, _, limit in checks], window)
        for (kind, _, limit), count in zip(checks, counts, strict=True):
            if count > limit:
                retry_after = max(1, math.ceil((window + 1) * WINDOW_S - stamp))
                raise Problem(
                    429,
                    "RATE_LIMITED",
                    f"more than {limit} requests per minute for this {kind}",
                    headers={"Retry-After": str(retry_after)},
                )

    async def check(self, kind: str, who: str, limit: int, now: datetime) -> None:
        await self.check_many([(kind, who, limit)], now)

    async def check_ip(self, ip: str, now: datetime) -> None:
        """Step 1 on a path whose view does not authenticate: count ``ip`` now."""
        await self.check("ip", ip, self.per_ip, now)

    async def check_user(self, user_id: str, now: datetime) -> None:
        await self.check("user", user_id, self.per_user, now)

    async def count_ip_late(self, noted: DeferredIp) -> None:
        """Step 3: the count, once the answer is given (no 429 can replace it any more)."""
        window = math.floor(noted.now.timestamp() / WINDOW_S)
        await self._counter.hit([f"ip:{noted.ip}"], [self.per_ip], window)

    async def check_ip_and_user(self, ip: str, user_id: str, now: datetime) -> None:
        """Step 2: both counts in one call (the user's only if the IP is within its limit)."""
        await self.check_many([("ip", ip, self.per_ip), ("user", user_id, self.per_user)], now)


def counts_user(request: web.Request) -> bool:
    """Whether the request's view authenticates through ``Gateway.principal`` before doing
    anything (every view under ``/api/`` but the webhooks, which are not limited)."""
    if request.method == "OPTIONS" or request.match_info.route.resource is None:
        return False  # a CORS preflight, an unknown path: no view of ours authenticates
    return request.path.startswith("/api/") and not request.path.startswith("/api/webhooks/")


def deferred_ip(request: web.Request) -> DeferredIp | None:
    """Step 2: take the request's per-IP count left for it by step 1, if any."""
    noted: DeferredIp | None = request.pop(DEFERRED_IP_KEY, None)
    return noted
