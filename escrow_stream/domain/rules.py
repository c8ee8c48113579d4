"""The rule of each command that reaches its status: funding, cancellation, delivery,
disputes, milestones and chargebacks (``settlement_rules`` has releases, refunds and their
results).

``decide`` has already checked the escrow exists, the command is new, the actor may send it,
no chargeback or settlement blocks it and the status allows it; a rule checks what is left
(deadlines, KYC, the payload against the state) and returns the event data, or a Refusal.

Event data is built without validating again (``_model.trusted``, issue 13): every field is
a field of the validated command or of the state, with the same or stricter constraints in
the data model, or derived within them (``now`` plus days, an amount still held and checked
positive, a receivable of at most the chargeback's amount, an account name of an id).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from ._model import trusted
from .commands import (
    CancelEscrow,
    CloseChargeback,
    ConfirmFunds,
    DeliverMilestone,
    MarkDelivered,
    OpenChargeback,
    RaiseDispute,
    RecordPaymentFailure,
    RecordPaymentInstructions,
)
from .escrow import (
    TERMINAL_STATUSES,
    Escrow,
    EscrowStatus,
    MilestoneStatus,
)
from .event_data import (
    ChargebackClosedData,
    ChargebackOpenedData,
    EscrowCancelledData,
    EscrowDeliveredData,
    EscrowDisputedData,
    EscrowFundsHeldData,
    EscrowRefundedData,
    EventData,
    MilestoneDeliveredData,
    PaymentFailedData,
    PaymentInstructionsRecordedData,
)
from .guards import (
    check_deadline_reached,
    check_flagged_deposit_funds,
    check_funds_match,
    check_milestone_status,
    check_provider_matches_rail,
    find_milestone_or_refusal,
    is_system_timeout,
)
from .ledger import chargeback_receivable
from .money import RAIL_PROVIDER
from .payloads import CHARGEBACK_REASON, ChargebackOutcome
from .rejections import Refusal, RejectionCode
from .settings import DecisionContext, DomainSettings

RuleResult = EventData | Refusal
Rule = Callable[[Escrow, Any, datetime, DomainSettings, DecisionContext | None], RuleResult]


def record_instructions(
    state: Escrow,
    cmd: RecordPaymentInstructions,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    p = cmd.payload
    return check_provider_matches_rail(state, p.provider) or trusted(
        PaymentInstructionsRecordedData,
        provider=p.provider,
        provider_payment_id=p.provider_payment_id,
        deposit_address=p.deposit_address,
    )


def confirm_funds(
    state: Escrow,
    cmd: ConfirmFunds,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    p = cmd.payload
    return (
        check_provider_matches_rail(state, p.provider)
        or check_funds_match(state, cmd)
        or trusted(
            EscrowFundsHeldData,
            provider=p.provider,
            provider_payment_id=p.provider_payment_id,
            amount=p.amount,
            currency=p.currency,
            sender_address=p.sender_address,
        )
    )


def record_payment_failure(
    state: Escrow,
    cmd: RecordPaymentFailure,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    p = cmd.payload
    return check_provider_matches_rail(state, p.provider) or trusted(
        PaymentFailedData,
        provider=p.provider,
        provider_payment_id=p.provider_payment_id,
        error_code=p.error_code,
        error_message=p.error_message,
    )


def cancel(
    state: Escrow,
    cmd: CancelEscrow,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    if is_system_timeout(cmd):
        refusal = check_deadline_reached(state.expires_at, now, "payment deadline")
        if refusal is not None:
            return refusal
    refusal = check_flagged_deposit_funds(state, cmd)
    if refusal is not None:
        return refusal
    return trusted(EscrowCancelledData, reason=cmd.payload.reason)


def mark_delivered(
    state: Escrow,
    cmd: MarkDelivered,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    return trusted(
        EscrowDeliveredData,
        note=cmd.payload.note,
        evidence_keys=cmd.payload.evidence_keys,
        auto_refund_at=now + timedelta(days=settings.auto_refund_deadline_days),
    )


def raise_dispute(
    state: Escrow,
    cmd: RaiseDispute,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    return trusted(
        EscrowDisputedData, reason=cmd.payload.reason, evidence_keys=cmd.payload.evidence_keys
    )


def deliver_milestone(
    state: Escrow,
    cmd: DeliverMilestone,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    found = find_milestone_or_refusal(state, cmd.payload.milestone_id)
    if isinstance(found, Refusal):
        return found
    refusal = check_milestone_status(found, MilestoneStatus.PENDING)
    if refusal is not None:
        return refusal
    others_done = all(
        m.status != MilestoneStatus.PENDING
        for m in state.milestones
        if m.milestone_id != found.milestone_id
    )
    escrow_delivered = others_done and state.status == EscrowStatus.FUNDS_HELD
    return trusted(
        MilestoneDeliveredData,
        milestone_id=found.milestone_id,
        escrow_delivered=escrow_delivered,
        auto_refund_at=(
            now + timedelta(days=settings.auto_refund_deadline_days) if escrow_delivered else None
        ),
    )


# --- chargebacks (SPEC §10, Stripe only) -------------------------------------------------


def open_chargeback(
    state: Escrow,
    cmd: OpenChargeback,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    """Record the chargeback; book what the held funds do not cover as a receivable."""
    p = cmd.payload
    refusal = check_provider_matches_rail(state, p.provider)
    if refusal is not None:
        return refusal
    if state.chargeback is not None:  # the same dispute id is a no-op, decided before
        return Refusal(
            RejectionCode.INVALID_TRANSITION,
            f"the escrow already has chargeback {state.chargeback.dispute_id}",
        )
    if p.currency != state.currency or p.amount > state.funded_amount:
        return Refusal(
            RejectionCode.VALIDATION_FAILED,
            f"chargeback of {p.amount} {p.currency.value} on a payment of "
            f"{state.funded_amount} {state.currency.value}",
        )
    receivable, account = chargeback_receivable(state, p.amount)
    return trusted(
        ChargebackOpenedData,
        provider=p.provider,
        dispute_id=p.dispute_id,
        charge_id=p.charge_id,
        payment_intent_id=p.payment_intent_id,
        amount=p.amount,
        currency=p.currency,
        reason=p.reason,
        receivable_amount=receivable,
        receivable_account=account,
    )


def close_chargeback(
    state: Escrow,
    cmd: CloseChargeback,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    """WON: the receivable reversed, the escrow continues.  LOST: the network refunded the
    buyer — from the held funds (the escrow ends REFUNDED, reason CHARGEBACK), or, once they
    have left, at the platform's cost (the receivable stays)."""
    p = cmd.payload
    chargeback = state.chargeback
    if chargeback is None or chargeback.dispute_id != p.dispute_id:
        return Refusal(RejectionCode.INVALID_TRANSITION, f"no chargeback {p.dispute_id}")
    if not state.chargeback_open:
        return Refusal(
            RejectionCode.INVALID_TRANSITION,
            f"chargeback {p.dispute_id} was closed {chargeback.status.value} already",
        )
    holding = state.holding_amount
    lost = p.outcome == ChargebackOutcome.LOST
    if lost and holding > 0 and state.status not in TERMINAL_STATUSES:
        attempt = state.settlement.attempt if state.settlement is not None else 1
        return trusted(
            EscrowRefundedData,
            provider=RAIL_PROVIDER[state.rail],
            provider_reference=p.dispute_id,
            attempt=max(attempt, state.settlement_attempts, 1),
            amount=holding,
            reason=CHARGEBACK_REASON,
        )
    if not lost:
        return trusted(
            ChargebackClosedData,
            dispute_id=p.dispute_id,
            outcome=p.outcome,
            amount=p.amount,
            reversed_amount=chargeback.receivable_amount,
        )
    # funds that left while it was open (a settlement confirmed meanwhile) are owed too
    uncovered, account = chargeback_receivable(state, chargeback.amount)
    top_up = max(0, uncovered - chargeback.receivable_amount)
    return trusted(
        ChargebackClosedData,
        dispute_id=p.dispute_id,
        outcome=p.outcome,
        amount=p.amount,
        booked_amount=top_up,
        booked_account=(chargeback.receivable_account or account) if top_up else None,
    )
