"""The in-memory idempotency store: the fake for unit tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from escrow_stream.db.unit_of_work import UnitOfWork
from escrow_stream.idempotency.protocol import IN_FLIGHT_LEASE_S, Begin, BeginKind, existing


@dataclass
class _Record:
    request_hash: str
    state: str
    created_at: datetime
    expires_at: datetime
    status: int | None = None
    body: Any = None


class MemoryIdempotencyStore:
    """The in-memory fake for unit tests (one process; atomic because it never awaits)."""

    def __init__(
        self, ttl: timedelta, in_flight_lease: timedelta = timedelta(seconds=IN_FLIGHT_LEASE_S)
    ) -> None:
        self._ttl = ttl
        self._lease = in_flight_lease
        self._records: dict[tuple[str, str], _Record] = {}

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin:
        record = self._records.get((user_id, key))
        if record is not None and record.expires_at > now:
            return existing(
                record.request_hash, record.state, record.status, record.body, request_hash
            )
        self._records[(user_id, key)] = _Record(request_hash, "in_flight", now, now + self._lease)
        return Begin(BeginKind.NEW)

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None:
        record = self._records.get((user_id, key))
        if record is not None and record.state == "in_flight":
            record.state, record.status, record.body = "completed", status, body
            record.expires_at = record.created_at + self._ttl

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """Completes once the unit has committed, as Redis does."""
        unit.after_commit(partial(self.complete, user_id, key, status, body))

    async def abandon(self, user_id: str, key: str) -> None:
        record = self._records.get((user_id, key))
        if record is not None and record.state == "in_flight":
            del self._records[(user_id, key)]

    async def purge_expired(self, now: datetime) -> int:
        expired = [k for k, r in self._records.items() if r.expires_at <= now]
        for k in expired:
            del self._records[k]
        return len(expired)
