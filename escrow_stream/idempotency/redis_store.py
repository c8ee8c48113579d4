"""The idempotency store in Redis: one hash per (user, key), changed only by Lua scripts."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import redis.asyncio

from escrow_stream.db.unit_of_work import UnitOfWork
from escrow_stream.idempotency.protocol import IN_FLIGHT_LEASE_S, Begin, BeginKind, existing

log = logging.getLogger("escrow_stream.idempotency")  # one logger for every store

# KEYS[1] record; ARGV: hash, now_ms, lease_ms.  Returns nil (reserved) or the live record.
_BEGIN_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'hash', 'state', 'status', 'body', 'expires_ms')
if cur[1] and tonumber(cur[5]) and tonumber(cur[5]) > tonumber(ARGV[2]) then
  return {cur[1], cur[2], cur[3], cur[4]}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'state', 'in_flight', 'created_ms', ARGV[2],
           'expires_ms', string.format('%.0f', tonumber(ARGV[2]) + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return nil
"""

# KEYS[1] record; ARGV: status, body (JSON), ttl_ms.  Returns 1 when completed.
_COMPLETE_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'in_flight' then return 0 end
local created = tonumber(redis.call('HGET', KEYS[1], 'created_ms'))
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[1], 'body', ARGV[2],
           'expires_ms', string.format('%.0f', created + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] record.  Deletes it only while in flight.
_ABANDON_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'in_flight' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisIdempotencyStore:
    """``IDEMPOTENCY_STORAGE=redis``: one hash per (user, key), changed only by Lua scripts.

    Expiry follows the injected ``now`` (the record's ``expires_ms``); the key's Redis TTL
    (lease, then TTL from completion) only makes Redis forget it no earlier than that.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        ttl: timedelta,
        prefix: str = "escrow:idempotency",
        in_flight_lease: timedelta = timedelta(seconds=IN_FLIGHT_LEASE_S),
    ) -> None:
        self._redis = client
        self._ttl_ms = int(ttl.total_seconds() * 1000)
        self._lease_ms = int(in_flight_lease.total_seconds() * 1000)
        self._prefix = prefix
        self._begin = client.register_script(_BEGIN_LUA)
        self._complete = client.register_script(_COMPLETE_LUA)
        self._abandon = client.register_script(_ABANDON_LUA)

    def key(self, user_id: str, key: str) -> str:
        """The Redis key of a record (the user's length keeps ``a:b`` + ``c`` apart)."""
        return f"{self._prefix}:{len(user_id)}:{user_id}:{key}"

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        now_ms = int(now.timestamp() * 1000)
        found = await self._begin(
            keys=[self.key(user_id, key)], args=[request_hash, now_ms, self._lease_ms]
        )
        if found is None:
            return Begin(BeginKind.NEW)
        stored_hash, state, status, body = found
        return existing(
            _text(stored_hash),
            _text(state),
            int(status) if status is not None else None,
            json.loads(body) if body is not None else None,
            request_hash,
        )

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        done = await self._complete(
            keys=[self.key(user_id, key)], args=[status, json.dumps(body), self._ttl_ms]
        )
        if not done:
            log.warning("idempotency: no reservation left to complete for user %s", user_id)

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """Redis is outside the outbox transaction: completes once the unit has committed."""
        unit.after_commit(partial(self.complete, user_id, key, status, body))

    async def abandon(self, user_id: str, key: str) -> None:
        await self._abandon(keys=[self.key(user_id, key)])

    async def purge_expired(self, now: datetime) -> int:
        return 0  # Redis expires the keys itself


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
