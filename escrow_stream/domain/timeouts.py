"""Which timeout command is due for an escrow, and from when (pure; the timeout processor
sends it).

A timeout command has the deterministic commandId ``timeout:{escrowId}:{status}:{version}``
so that any number of timer instances produce the same command, which the escrow then
dedupes; the processor re-checks the deadline when it decides.

The deadlines are functions of the escrow alone (and the worker's settings), so the timeout
processor can keep them in an index updated with every write of the state and look only at
the escrows whose time has come (``escrow_stream.tables.deadlines``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from .commands import CancelEscrow, Command, RefundEscrow, ReleaseFunds
from .escrow import TERMINAL_STATUSES, Actor, ActorRole, Escrow, EscrowStatus
from .money import Rail
from .payloads import (
    TIMEOUT_REASON,
    CancelEscrowPayload,
    CancelReason,
    RefundEscrowPayload,
    ReleaseFundsPayload,
)
from .settings import DomainSettings

TIMEOUT_ACTOR = Actor(id="timeout-processor", role=ActorRole.SYSTEM)


def timeout_command_id(escrow: Escrow) -> str:
    """The deterministic commandId of the timeout for the escrow's current version."""
    return f"timeout:{escrow.escrow_id}:{escrow.status.value}:{escrow.version}"


def timeout_command_for(escrow: Escrow, now: datetime, settings: DomainSettings) -> Command | None:
    """The timeout command due for `escrow` at `now`, or None when nothing is due.

    1. AWAIT_FUNDS at or past expiresAt: CancelEscrow{TIMEOUT}.
    2. DELIVERED at or past autoRefundAt, with FEATURE_AUTO_REFUND on: RefundEscrow{TIMEOUT}
       or, with delivered_timeout_action "release", ReleaseFunds{reason TIMEOUT}.
    Nothing is due while a settlement is pending or awaits the seller's payout account, and
    no DELIVERED timeout acts on an escrow whose release was approved (SPEC §10: an approved
    release is never turned into a refund by a timer, even after that release failed).
    Nor while a chargeback is open: the escrow would refuse it CHARGEBACK_OPEN, again at
    every poll; the timer acts once it is won (a lost one ends the escrow).
    """
    deadline = timeout_deadline(escrow, settings)
    if deadline is None or now < deadline:
        return None
    common = {
        "command_id": timeout_command_id(escrow),
        "escrow_id": escrow.escrow_id,
        "actor": TIMEOUT_ACTOR,
        "issued_at": now,
    }
    if escrow.status == EscrowStatus.AWAIT_FUNDS:
        return CancelEscrow(payload=CancelEscrowPayload(reason=CancelReason.TIMEOUT), **common)
    if settings.delivered_timeout_action == "release":
        return ReleaseFunds(payload=ReleaseFundsPayload(reason=TIMEOUT_REASON), **common)
    return RefundEscrow(payload=RefundEscrowPayload(reason=TIMEOUT_REASON), **common)


def timeout_deadline(escrow: Escrow, settings: DomainSettings) -> datetime | None:
    """From when a timeout is due for `escrow` as it is, or None while none can be: for
    every ``now``, ``timeout_command_for(escrow, now, settings)`` is a command exactly when
    this is a time at or before ``now`` (the rules are those of ``timeout_command_for``)."""
    if escrow.settlement is not None or escrow.chargeback_open:
        return None
    if escrow.status == EscrowStatus.AWAIT_FUNDS:
        return escrow.expires_at
    if (
        escrow.status == EscrowStatus.DELIVERED
        and settings.feature_auto_refund
        and escrow.release_approved_at is None
    ):
        return escrow.auto_refund_at
    return None


def holds_card_funds_past(escrow: Escrow, now: datetime, days: int) -> bool:
    """True for a STRIPE escrow still holding funds more than ``days`` after funding (SPEC
    §10 holding limits: card funds cannot be held indefinitely)."""
    warning_after = hold_warning_after(escrow, days)
    return warning_after is not None and now > warning_after


def hold_warning_after(escrow: Escrow, days: int) -> datetime | None:
    """The time after which (strictly) ``holds_card_funds_past(escrow, now, days)`` is true
    for `escrow` as it is, or None when it is never true: funding + ``days``."""
    payment = escrow.payment
    if (
        escrow.rail == Rail.STRIPE
        and escrow.status not in TERMINAL_STATUSES
        and escrow.holding_amount > 0
        and payment is not None
        and payment.funded_at is not None
    ):
        return payment.funded_at + timedelta(days=days)
    return None


class Deadlines(NamedTuple):
    """The times at which the timeout processor's view of an escrow changes."""

    #: From when its timeout command is due (``timeout_deadline``).
    timeout_at: datetime | None = None
    #: After when it counts as a STRIPE hold past the warning (``hold_warning_after``).
    hold_warning_after: datetime | None = None


#: An escrow the timeout processor never has to look at, as it is.
NO_DEADLINES = Deadlines()


def deadlines_of(escrow: Escrow, settings: DomainSettings, hold_warn_days: int | None) -> Deadlines:
    """Both of `escrow`'s deadlines (no hold warning without ``hold_warn_days``)."""
    return Deadlines(
        timeout_deadline(escrow, settings),
        None if hold_warn_days is None else hold_warning_after(escrow, hold_warn_days),
    )
