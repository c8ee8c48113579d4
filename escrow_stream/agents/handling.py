"""Turning one raw message from ``escrow-commands`` into an outcome, without any I/O.

Steps, in order (each failing step ends the handling):

1. Decode: the value must be UTF-8 JSON holding an object → else dead letter
   ``invalid_json``.
2. Parse: the envelope and payload must validate (``parse_command``) → else dead letter
   ``invalid_schema`` (``unknown_type`` for a type we do not know).
3. Route: the message key must be the command's escrowId, or per-escrow ordering would be
   broken → else dead letter ``key_mismatch``.
4. Trust: a ``system`` actor needs a valid ``x-escrow-signature`` → else rejection
   ``NOT_AUTHORIZED`` (a well-formed command that is refused, not a poison message).  This
   rejection is not recorded: system commandIds are predictable, and recording an unsigned
   forgery would pre-empt the genuine signed command.
5. Recorded outcome: a commandId (from the same actor) that was rejected or was a no-op
   before gets that outcome again (``tables.outcomes``); accepted commands are
   recognised by the escrow itself in step 6.  With another type or payload than the
   recorded one (``command_fingerprint``) it is refused ``COMMAND_ID_REUSED`` instead,
   unrecorded, here and in step 6.
6. Decide with the domain core → events (possibly a duplicate's recorded events) or a
   rejection / no-op, which the caller records (``Outcome.record``).

An unexpected exception in steps 1-6 is a bug, not bad input; it is dead-lettered as
``handler_error`` so one message can never stop the processor.

The processor parses each message once (``read_command``), finds the escrow's state and the
facts the decision needs (``facts_needed``) from the parsed command, then calls
``handle_command``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar

from escrow_stream.domain import (
    COMMAND_TYPES,
    ActorRole,
    Command,
    CommandInvalid,
    CreateEscrow,
    DecisionContext,
    DomainSettings,
    Escrow,
    Event,
    Rejection,
    RejectionCode,
    ResumeSettlement,
    command_fingerprint,
    decide,
    is_release_path,
    parse_command,
)
from escrow_stream.signing import HeaderItems, verify
from escrow_stream.tables import outcomes

DETAIL_LENGTH_MAX = 1000


class DeadLetterReason(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_SCHEMA = "invalid_schema"
    UNKNOWN_TYPE = "unknown_type"
    KEY_MISMATCH = "key_mismatch"
    HANDLER_ERROR = "handler_error"


@dataclass(frozen=True)
class DeadLetter:
    reason: DeadLetterReason
    detail: str


@dataclass(frozen=True)
class Outcome:
    """What to do with one message: write ``state`` and send ``events``, or a rejection,
    or a dead letter."""

    command: Command | None = None
    state: Escrow | None = None
    events: list[Event] = field(default_factory=list)
    rejection: Rejection | None = None
    dead_letter: DeadLetter | None = None
    duplicate: bool = False
    #: True when this rejection / no-op must be stored in the outcomes table (step 6).
    record: bool = False

    @property
    def outcome_label(self) -> str:
        if self.dead_letter is not None:
            return "dead_letter"
        if self.rejection is not None:
            return "rejected"
        if self.duplicate:
            return "duplicate"
        return "accepted" if self.events else "no_op"


_R = TypeVar("_R")
_P = ParamSpec("_P")


def _dead_on_error(step: Callable[_P, _R]) -> Callable[_P, _R | Outcome]:
    """An unexpected exception in ``step`` is a bug, not bad input: dead-lettered as
    ``handler_error`` so one message can never stop the processor."""

    @functools.wraps(step)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R | Outcome:
        try:
            return step(*args, **kwargs)
        except Exception as exc:
            return _dead(DeadLetterReason.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")

    return guarded


@_dead_on_error
def read_command(key: bytes | None, value: bytes | None) -> Command | Outcome:
    """Steps 1-3, once per message: the command a message holds, or the dead letter it is.
    The caller finds the escrow's state and the decision's facts from the parsed command."""
    if not value:
        return _dead(DeadLetterReason.INVALID_JSON, "empty message value")
    return _read(key, value)


@_dead_on_error
def handle_command(
    command: Command,
    value: bytes,
    headers: HeaderItems | None,
    state: Escrow | None,
    recorded: dict[str, Any] | None,
    now: datetime,
    settings: DomainSettings,
    internal_secret: str,
    context: DecisionContext | None = None,
) -> Outcome:
    """Steps 4-6 for a command ``read_command`` parsed from ``value`` (whose bytes the
    signature covers): trust and the recorded outcome (4-5), the decision (6)."""
    if command.actor.role is ActorRole.SYSTEM and not verify(internal_secret, value, headers):
        refusal = _refusal(
            command,
            now,
            RejectionCode.NOT_AUTHORIZED,
            "system commands need a valid x-escrow-signature header",
        )
        return Outcome(command=command, state=state, rejection=refusal)
    found = outcomes.find(recorded, outcomes.record_key(command))
    if found is not None and found.fingerprint not in (None, command_fingerprint(command)):
        return Outcome(command=command, state=state, rejection=_reused(command, now))
    if found is not None:
        return Outcome(command=command, state=state, rejection=found.outcome, duplicate=True)
    return _decided(state, command, now, settings, context)


def facts_needed(command: Command, state: Escrow | None) -> tuple[frozenset[str], bool]:
    """What deciding ``command`` needs looked up: the parties whose KYC counts (creation and
    every release path) and whether it needs the seller's payout account (every release
    path, and ResumeSettlement)."""
    if isinstance(command, CreateEscrow):
        return frozenset({command.payload.buyer_id, command.payload.seller_id}), False
    if state is None:
        return frozenset(), False
    if isinstance(command, ResumeSettlement):
        return frozenset(), True
    if is_release_path(command.type, getattr(command.payload, "resolution", None)):
        return frozenset({state.buyer_id, state.seller_id}), True
    return frozenset(), False


def _read(key: bytes | None, value: bytes) -> Command | Outcome:
    """Steps 1-3: the command a non-empty value holds, or the dead letter it is."""
    try:
        data = json.loads(value)
    except (ValueError, RecursionError) as exc:  # incl. invalid UTF-8 and deep nesting
        return _dead(DeadLetterReason.INVALID_JSON, f"{type(exc).__name__}: {exc}")
    if not isinstance(data, dict):
        return _dead(DeadLetterReason.INVALID_SCHEMA, "a command must be a JSON object")
    try:
        command = parse_command(data)
    except CommandInvalid as exc:
        unknown = data.get("type") not in COMMAND_TYPES
        reason = DeadLetterReason.UNKNOWN_TYPE if unknown else DeadLetterReason.INVALID_SCHEMA
        return _dead(reason, str(exc))
    if key is None or key.decode("utf-8", "replace") != command.escrow_id:
        return _dead(
            DeadLetterReason.KEY_MISMATCH,
            f"message key {key!r} is not the command's escrowId {command.escrow_id!r}",
        )
    return command


def _decided(
    state: Escrow | None,
    command: Command,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> Outcome:
    """Step 6: the domain core's decision as an outcome."""
    decision = decide(state, command, now, settings, context)
    if decision.rejection is not None:
        # a reused commandId is refused without being recorded: recording it under the
        # command's key would answer the genuine command's redelivery with this refusal
        reused = decision.rejection.code is RejectionCode.COMMAND_ID_REUSED
        return Outcome(
            command=command, state=state, rejection=decision.rejection, record=not reused
        )
    if not decision.events:
        return Outcome(command=command, state=state, record=True)
    return Outcome(
        command=command,
        state=decision.state_after(state),
        events=list(decision.events),
        duplicate=decision.duplicate,
    )


def _reused(command: Command, now: datetime) -> Rejection:
    return _refusal(
        command,
        now,
        RejectionCode.COMMAND_ID_REUSED,
        f"commandId {command.command_id} was used before with another payload",
    )


def _refusal(command: Command, now: datetime, code: RejectionCode, message: str) -> Rejection:
    """The rejection of ``command`` with ``code``, refused by the handling itself."""
    return Rejection(
        command_id=command.command_id,
        type=command.type,
        escrow_id=command.escrow_id,
        code=code,
        message=message,
        rejected_at=now,
        correlation_id=command.correlation_id,
        trace_id=command.trace_id,
    )


def _dead(reason: DeadLetterReason, detail: str) -> Outcome:
    return Outcome(dead_letter=DeadLetter(reason, detail[:DETAIL_LENGTH_MAX]))
