"""The ``command-outcomes`` table: escrowId → recent commands that produced no event.

Accepted commands are remembered by the escrow itself (``recentCommands``, rebuilt from its
events).  Rejections and no-ops change no state and emit no event, so without this table a
redelivered rejected command would be decided *again* — against a state that later commands
may have changed, giving a different answer (a ReleaseFunds refused in FUNDS_HELD could be
accepted on redelivery once the escrow is DELIVERED).  Recording them here, in the same
partition as the escrow, keeps SPEC §3 rule 1 for every outcome: a commandId seen before
gets its recorded outcome back.

Value: ``{"entries": [{"key": ..., "rejection": {...} | null, "fingerprint": ...}, ...]}``
(the fingerprint of the command's type and payload, ``domain.command_fingerprint``: the same
commandId with another payload is COMMAND_ID_REUSED, not this outcome), oldest first, at
most ``ESCROW_RECENT_COMMANDS_MAX`` entries (FIFO eviction).  The key is the commandId with
the sender's role and id (:func:`record_key`): a redelivery has the same sender, and a
forger reusing someone else's commandId cannot pre-empt their command's outcome.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import faust
from faust.types import TableT

from escrow_stream.domain import Command, Rejection

TABLE_NAME = "command-outcomes"
TABLE_HELP = "Recent rejected and no-op commands by escrowId, for duplicate detection."

RecordedOutcome = Rejection | None  # None: the command was a no-op


def define(app: faust.App, partitions: int) -> TableT[str, Any]:
    return app.Table(TABLE_NAME, partitions=partitions, key_type=str, help=TABLE_HELP)


class Found(NamedTuple):
    """A recorded command: its outcome, and its fingerprint (None in older entries)."""

    outcome: RecordedOutcome
    fingerprint: str | None


def record_key(command: Command) -> str:
    """A command's key in this table: its commandId, its sender's role and id."""
    return f"{command.command_id}|{command.actor.role}|{command.actor.id}"


def _sent(key: str) -> tuple[str, str]:
    """(commandId, sender id) of a :func:`record_key`."""
    command_id, _, rest = key.partition("|")
    return command_id, rest.partition("|")[2]


def _found(entry: dict[str, Any]) -> Found:
    rejection = entry.get("rejection")
    outcome = None if rejection is None else Rejection.model_validate(rejection)
    return Found(outcome, entry.get("fingerprint"))


def find(value: dict[str, Any] | None, key: str) -> Found | None:
    """The recorded outcome of the command ``key`` in a stored value, if any."""
    for entry in (value or {}).get("entries", []):
        if entry["key"] == key:
            return _found(entry)
    return None


def find_command(
    value: dict[str, Any] | None, command_id: str, sender_id: str | None = None
) -> Found | None:
    """The first recorded outcome of commandId ``command_id`` whoever sent it, or (with
    ``sender_id``) only one that user sent."""
    for entry in (value or {}).get("entries", []):
        recorded_id, sender = _sent(entry["key"])
        if recorded_id == command_id and sender_id in (None, sender):
            return _found(entry)
    return None


def record(
    value: dict[str, Any] | None,
    key: str,
    outcome: RecordedOutcome,
    entries_max: int,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """The stored value with command ``key``'s outcome appended (oldest evicted first)."""
    entries = list((value or {}).get("entries", []))
    rejection = None if outcome is None else outcome.model_dump(mode="json", by_alias=True)
    entries.append({"key": key, "rejection": rejection, "fingerprint": fingerprint})
    return {"entries": entries[-entries_max:]}
