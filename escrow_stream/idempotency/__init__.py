"""``Idempotency-Key`` records (SPEC §4), per user and key, in PostgreSQL, Redis or memory.

Protocol of one keyed request (the gateway):

1. ``begin(user, key, request_hash, now)`` reserves the key — NEW, state in flight for
   ``IN_FLIGHT_LEASE_S`` — or answers from an existing, unexpired record: REPLAY (same
   hash, completed: the stored status and body), MISMATCH (other hash: 422
   ``IDEMPOTENCY_KEY_REUSED``) or CONFLICT_IN_FLIGHT (same hash, not completed: 409).
   Concurrent begins of one (user, key) yield exactly one NEW.
2. The request does its work and, in the unit of work that writes the outbox row
   (``db.unit_of_work``), calls ``complete_in(unit, …)``: every store completes the key with
   that unit, so the accepted command and its replayable response commit together.  The
   database store writes on the unit's connection (the same transaction); a store outside
   PostgreSQL (Redis, memory) completes once the unit has committed (``after_commit``), and
   never if it rolls back.
3. Completing makes the record live for ``IDEMPOTENCY_TTL_HOURS`` from its ``begin``;
   ``abandon`` instead drops an in-flight reservation (the request failed before anything
   was accepted).  ``complete`` is step 2 without a unit (its own transaction).

Why the reservation is a short lease, not the full TTL: a process that dies between steps
1 and 3 (before the outbox commit, or — Redis — between the outbox commit and
``complete``) would otherwise leave the key in flight, answering 409 to every retry for a
whole TTL.  With the lease, a retry after ``IN_FLIGHT_LEASE_S`` gets NEW and enqueues the
command again; the gateway derives commandId (and a new escrow's id) from user + key, so
it is the *same* command and the processor applies it once (SPEC §3, rule 1), and the
retry gets the same 202 body.  The cost: a request still running after the lease could
meet a twin that was given NEW — again the same command, applied once.

With ``IDEMPOTENCY_STORAGE=redis`` the store is :class:`FallbackIdempotencyStore`: Redis,
and the database while Redis is unreachable (the seed's "fallback to database").

Expired records count as absent.  ``purge_expired`` is the daily cleanup of the database
store; Redis expires its keys itself (the key TTL follows the record's expiry).
"""

from __future__ import annotations

from datetime import timedelta

import redis.asyncio

from escrow_stream.config import Settings
from escrow_stream.db.pool import Database
from escrow_stream.idempotency.database_store import PURGE_BATCH_MAX, DatabaseIdempotencyStore
from escrow_stream.idempotency.fallback_store import (
    PRIMARY_RETRY_AFTER_S,
    UNREACHABLE,
    FallbackIdempotencyStore,
)
from escrow_stream.idempotency.memory_store import MemoryIdempotencyStore
from escrow_stream.idempotency.protocol import (
    IN_FLIGHT_LEASE_S,
    Begin,
    BeginKind,
    IdempotencyStore,
)
from escrow_stream.idempotency.redis_store import RedisIdempotencyStore

__all__ = [
    "IN_FLIGHT_LEASE_S",
    "PRIMARY_RETRY_AFTER_S",
    "PURGE_BATCH_MAX",
    "UNREACHABLE",
    "Begin",
    "BeginKind",
    "DatabaseIdempotencyStore",
    "FallbackIdempotencyStore",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "RedisIdempotencyStore",
    "build_idempotency_store",
]


def build_idempotency_store(
    settings: Settings, database: Database, redis_client: redis.asyncio.Redis | None = None
) -> IdempotencyStore:
    """The store ``IDEMPOTENCY_STORAGE`` names, on the composition root's adapters."""
    ttl = timedelta(hours=settings.idempotency_ttl_hours)
    if settings.idempotency_storage == "redis":
        if redis_client is None:
            raise ValueError("IDEMPOTENCY_STORAGE=redis needs the app's Redis client")
        return FallbackIdempotencyStore(
            RedisIdempotencyStore(redis_client, ttl), DatabaseIdempotencyStore(database, ttl)
        )
    return DatabaseIdempotencyStore(database, ttl)
