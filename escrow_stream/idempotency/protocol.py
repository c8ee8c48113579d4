"""The idempotency store protocol (steps 1-3 of ``escrow_stream.idempotency``) and the
answers of ``begin``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from escrow_stream.db.unit_of_work import UnitOfWork

#: How long a NEW reservation blocks its key if the request never completes nor abandons.
IN_FLIGHT_LEASE_S = 60.0


class BeginKind(StrEnum):
    NEW = "new"
    REPLAY = "replay"
    CONFLICT_IN_FLIGHT = "in_flight"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Begin:
    kind: BeginKind
    status: int | None = None
    body: Any = None


class IdempotencyStore(Protocol):
    """Steps 1-3 of the package docstring (``escrow_stream.idempotency``)."""

    async def begin(self, user_id: str, key: str, request_hash: str, now: datetime) -> Begin: ...

    async def complete(self, user_id: str, key: str, status: int, body: Any) -> None: ...

    async def complete_in(
        self, unit: UnitOfWork, user_id: str, key: str, status: int, body: Any
    ) -> None:
        """Step 2: complete the key with the caller's unit of work (it commits with the
        outbox row, or not at all)."""
        ...

    async def abandon(self, user_id: str, key: str) -> None: ...

    async def purge_expired(self, now: datetime) -> int: ...


def existing(stored_hash: str, state: str, status: int | None, body: Any, new: str) -> Begin:
    """The answer ``begin`` gives for a live record (step 1): MISMATCH, CONFLICT_IN_FLIGHT
    or REPLAY."""
    if stored_hash != new:
        return Begin(BeginKind.MISMATCH)
    if state != "completed":
        return Begin(BeginKind.CONFLICT_IN_FLIGHT)
    return Begin(BeginKind.REPLAY, status, body)
