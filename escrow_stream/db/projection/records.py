"""The records the mirror receives, their parsing (step 2 of :mod:`escrow_stream.db.projection`)
and the result of a batch."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from escrow_stream.domain import Escrow, Event, EventInvalid, parse_event

BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
BIGINT_MIN = -(2**63)


@dataclass(frozen=True, slots=True)
class MirrorRecord:
    """One record of the events topic as the consumer received it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None


@dataclass(slots=True)
class MirrorResult:
    """What one :meth:`Mirror.apply` did with its records."""

    #: Events whose ``escrow_events`` row was new.
    applied: int = 0
    #: Events already mirrored (same eventId earlier in the batch or in the database).
    duplicates: int = 0
    #: Records below the partition's stored ``next_offset`` (already applied).
    skipped_by_offset: int = 0
    #: Records that are not a valid event (or that PostgreSQL rejected); skipped.
    invalid: int = 0

    @property
    def total(self) -> int:
        return self.applied + self.duplicates + self.skipped_by_offset + self.invalid


@dataclass(frozen=True, slots=True)
class Item:
    """A record that parsed: the event model and the decoded JSON (for the jsonb columns).

    Internal to :mod:`escrow_stream.db.projection`; the other modules of the package take it.
    """

    record: MirrorRecord
    event: Event
    raw: Mapping[str, Any]

    @property
    def escrow(self) -> Escrow:
        return self.event.escrow

    @property
    def snapshot(self) -> Mapping[str, Any]:
        snapshot: Mapping[str, Any] = self.raw["escrow"]
        return snapshot


class RecordInvalid(ValueError):
    """A record that cannot be mirrored."""


def parse_record(record: MirrorRecord) -> Item:
    """Decode and validate one record; raise :class:`RecordInvalid` with the reason."""
    if record.value is None:
        raise RecordInvalid("no value (tombstone)")
    try:
        raw = json.loads(record.value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordInvalid(f"not JSON: {exc}") from None
    try:
        event = parse_event(raw)
    except EventInvalid as exc:
        raise RecordInvalid(str(exc)) from None
    _check_storable(event, raw)
    return Item(record=record, event=event, raw=raw)


def _check_storable(event: Event, raw: Mapping[str, Any]) -> None:
    """What PostgreSQL needs beyond the domain's validation."""
    if event.escrow.escrow_id != event.escrow_id:
        raise RecordInvalid("snapshot belongs to another escrow")
    _require_uuid(event.event_id, "eventId")
    for posting in event.escrow.ledger:
        _require_uuid(posting.posting_id, "postingId")
    if _has_unstorable_text(raw):
        raise RecordInvalid("text with a NUL character or a lone surrogate (not storable)")
    if max(event.version, event.escrow.version) > INT_MAX:
        raise RecordInvalid("a version does not fit in integer")
    escrow = event.escrow
    amounts = [
        escrow.amount,
        escrow.funded_amount,
        escrow.released_amount,
        escrow.refunded_amount,
        *(m.amount for m in escrow.milestones),
        *(line.amount for p in escrow.ledger for line in p.lines),
    ]
    if any(not BIGINT_MIN <= a <= BIGINT_MAX for a in amounts):
        raise RecordInvalid("an amount does not fit in bigint")


def _require_uuid(value: str, field: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise RecordInvalid(f"{field} {value!r} is not a UUID") from None


def _has_unstorable_text(value: Any) -> bool:
    """True if a string holds what PostgreSQL text/jsonb cannot: NUL, or invalid UTF-8."""
    if isinstance(value, str):
        if "\x00" in value:
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, Mapping):
        return any(_has_unstorable_text(k) or _has_unstorable_text(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_unstorable_text(v) for v in value)
    return False


def json_text(value: Any) -> str | None:
    """``value`` as compact JSON text (for a ``::jsonb`` parameter); ``None`` stays ``None``."""
    return None if value is None else json.dumps(value, separators=(",", ":"))
