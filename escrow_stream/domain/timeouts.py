"""Which timeout command is due for an escrow (pure; the timeout processor sends it).

A timeout command has the deterministic commandId ``timeout:{escrowId}:{status}:{version}``
so that any number of timer instances produce the same command, which the escrow then
dedupes; the processor re-checks the deadline when it decides.
"""

from __future__ import annotations

from datetime import datetime, timedelta

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
    if escrow.settlement is not None or escrow.chargeback_open:
        return None
    common = {
        "command_id": timeout_command_id(escrow),
        "escrow_id": escrow.escrow_id,
        "actor": TIMEOUT_ACTOR,
        "issued_at": now,
    }
    if escrow.status == EscrowStatus.AWAIT_FUNDS and now >= escrow.expires_at:
        return CancelEscrow(payload=CancelEscrowPayload(reason=CancelReason.TIMEOUT), **common)
    if (
        escrow.status == EscrowStatus.DELIVERED
        and settings.feature_auto_refund
        and escrow.auto_refund_at is not None
        and now >= escrow.auto_refund_at
        and escrow.release_approved_at is None
    ):
        if settings.delivered_timeout_action == "release":
            return ReleaseFunds(payload=ReleaseFundsPayload(reason=TIMEOUT_REASON), **common)
        return RefundEscrow(payload=RefundEscrowPayload(reason=TIMEOUT_REASON), **common)
    return None


def holds_card_funds_past(escrow: Escrow, now: datetime, days: int) -> bool:
    """True for a STRIPE escrow still holding funds more than ``days`` after funding (SPEC
    §10 holding limits: card funds cannot be held indefinitely)."""
    payment = escrow.payment
    return (
        escrow.rail == Rail.STRIPE
        and escrow.status not in TERMINAL_STATUSES
        and escrow.holding_amount > 0
        and payment is not None
        and payment.funded_at is not None
        and now - payment.funded_at > timedelta(days=days)
    )
