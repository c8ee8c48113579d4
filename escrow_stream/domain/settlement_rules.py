"""The rules that move money out of the escrow: release, refund, dispute resolution,
milestone release, a resumed settlement and a settlement's result (SPEC §10).

Where a settlement pays is decided when it is requested: a RELEASE pays the seller's ACTIVE
payout account for the escrow's rail (``DecisionContext.seller_payout``), else it waits
AWAITING_PAYOUT_ACCOUNT; a REFUND pays the buyer's card (Stripe), or the given wallet, else
the deposit's sender (USDC).

A settlement's result (released, refunded, failed) is built without validating again
(``_model.trusted``, issue 13): its fields are the pending settlement's, validated when it
was recorded, and the validated command's.  A request is validated: its amounts are derived.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ._model import trusted
from .commands import (
    ConfirmSettlement,
    RecordSettlementFailure,
    RefundEscrow,
    ReleaseFunds,
    ReleaseMilestone,
    ResolveDispute,
    ResumeSettlement,
)
from .escrow import (
    SETTLED_MILESTONE_STATUSES,
    Escrow,
    EscrowStatus,
    Milestone,
    MilestoneStatus,
    SettlementKind,
)
from .event_data import (
    EscrowRefundedData,
    EscrowReleasedData,
    MilestoneReleasedData,
    SettlementFailedData,
    SettlementRequestedData,
)
from .guards import (
    actor_relation,
    check_deadline_reached,
    check_delivered_timeout_enabled,
    check_kyc_verified,
    check_milestone_status,
    check_provider_matches_rail,
    check_settlement_amount,
    find_milestone_or_refusal,
    is_system_timeout,
)
from .money import MINOR_DIGITS_MAX, Rail, release_fee
from .payouts import (
    BuyerDestination,
    PayoutDestination,
    SettlementStatus,
    WalletDestination,
    fits_rail,
)
from .rejections import Refusal, RejectionCode
from .rules import RuleResult
from .settings import DecisionContext, DomainSettings

#: The first amount with more digits than an amount may have.
_AMOUNT_LIMIT = 10**MINOR_DIGITS_MAX


def delivered_timeout(
    state: Escrow, now: datetime, settings: DomainSettings, action: str
) -> Refusal | None:
    return check_delivered_timeout_enabled(settings, action) or check_deadline_reached(
        state.auto_refund_at, now, "auto-refund deadline"
    )


def seller_payout(state: Escrow, context: DecisionContext | None) -> PayoutDestination | None:
    """The seller's ACTIVE payout account for the escrow's rail, when the caller found one."""
    destination = context.seller_payout if context is not None else None
    return destination if fits_rail(destination, state.rail) else None


def refund_destination(state: Escrow) -> PayoutDestination | None:
    """The buyer: the card (Stripe), else the given wallet or the deposit's sender (USDC)."""
    if state.rail == Rail.STRIPE:
        return BuyerDestination()
    payment = state.payment
    address = state.buyer_wallet_address or (payment.sender_address if payment else None)
    return WalletDestination(address=address) if address else None


def settlement_request(
    state: Escrow,
    kind: SettlementKind,
    reason: str,
    context: DecisionContext | None,
    milestone: Milestone | None = None,
    resolution: SettlementKind | None = None,
) -> SettlementRequestedData:
    """Ask to move a milestone's amount, or everything still held, to seller or buyer."""
    amount = milestone.amount if milestone is not None else state.holding_amount
    fee = 0
    status = SettlementStatus.PENDING
    if kind == SettlementKind.RELEASE:
        fee = release_fee(state.seller_fee, state.amount, state.released_amount, amount)
        destination = seller_payout(state, context)
        if destination is None:
            status = SettlementStatus.AWAITING_PAYOUT_ACCOUNT
    else:
        destination = refund_destination(state)
    attempt = state.settlement_attempts + 1
    fields: dict[str, Any] = {
        "kind": kind,
        "attempt": attempt,
        "reason": reason,
        "milestone_id": milestone.milestone_id if milestone is not None else None,
        "amount": amount,
        "payout_amount": amount - fee,
        "fee_amount": fee,
        "resolution": resolution,
        "status": status,
        "destination": destination,
    }
    # the reason, milestone and destination are validated values; the numbers are derived:
    # within their bounds (attempt >= 1, 0 < amount of at most 30 digits, 0 <= fee <=
    # amount) they are taken as they are, else validated (and refused) as they always were
    if attempt >= 1 and 0 < amount < _AMOUNT_LIMIT and 0 <= fee <= amount:
        return trusted(SettlementRequestedData, **fields)
    return SettlementRequestedData(**fields)


def release(
    state: Escrow,
    cmd: ReleaseFunds,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    if is_system_timeout(cmd):
        refusal = delivered_timeout(state, now, settings, "release")
        if refusal is not None:
            return refusal
    refusal = check_kyc_verified(settings, context, (state.buyer_id, state.seller_id))
    if refusal is not None:
        return refusal
    reason = cmd.payload.reason or f"RELEASED_BY_{actor_relation(state, cmd.actor).upper()}"
    return settlement_request(state, SettlementKind.RELEASE, reason, context)


def resolve_dispute(
    state: Escrow,
    cmd: ResolveDispute,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    p = cmd.payload
    if p.resolution == SettlementKind.RELEASE:
        refusal = check_kyc_verified(settings, context, (state.buyer_id, state.seller_id))
        if refusal is not None:
            return refusal
    return settlement_request(state, p.resolution, p.reason, context, resolution=p.resolution)


def refund(
    state: Escrow,
    cmd: RefundEscrow,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    if is_system_timeout(cmd):
        refusal = delivered_timeout(state, now, settings, "refund")
        if refusal is not None:
            return refusal
    return settlement_request(state, SettlementKind.REFUND, cmd.payload.reason, context)


def confirm_settlement(
    state: Escrow,
    cmd: ConfirmSettlement,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    p = cmd.payload
    settlement = state.settlement
    assert settlement is not None  # guaranteed by check_settlement_state
    refusal = check_provider_matches_rail(state, p.provider) or check_settlement_amount(state, cmd)
    if refusal is not None:
        return refusal
    if settlement.milestone_id is not None:
        return trusted(
            MilestoneReleasedData,
            milestone_id=settlement.milestone_id,
            provider=p.provider,
            provider_reference=p.provider_reference,
            attempt=settlement.attempt,
            amount=settlement.amount,
            payout_amount=settlement.payout_amount,
            fee_amount=settlement.fee_amount,
        )
    if settlement.kind == SettlementKind.RELEASE:
        return trusted(
            EscrowReleasedData,
            provider=p.provider,
            provider_reference=p.provider_reference,
            attempt=settlement.attempt,
            amount=settlement.amount,
            payout_amount=settlement.payout_amount,
            fee_amount=settlement.fee_amount,
        )
    return trusted(
        EscrowRefundedData,
        provider=p.provider,
        provider_reference=p.provider_reference,
        attempt=settlement.attempt,
        amount=settlement.amount,
    )


def record_settlement_failure(
    state: Escrow,
    cmd: RecordSettlementFailure,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    settlement = state.settlement
    assert settlement is not None  # guaranteed by check_settlement_state
    p = cmd.payload
    return trusted(
        SettlementFailedData,
        kind=settlement.kind,
        attempt=settlement.attempt,
        milestone_id=settlement.milestone_id,
        error_code=p.error_code,
        error_message=p.error_message,
        retryable=p.retryable,
    )


def release_milestone(
    state: Escrow,
    cmd: ReleaseMilestone,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    refusal = check_kyc_verified(settings, context, (state.buyer_id, state.seller_id))
    if refusal is not None:
        return refusal
    found = find_milestone_or_refusal(state, cmd.payload.milestone_id)
    if isinstance(found, Refusal):
        return found
    refusal = check_milestone_status(found, MilestoneStatus.DELIVERED)
    if refusal is not None:
        return refusal
    last = all(
        m.status in SETTLED_MILESTONE_STATUSES
        for m in state.milestones
        if m.milestone_id != found.milestone_id
    )
    if last and state.status != EscrowStatus.DELIVERED:
        return Refusal(
            RejectionCode.INVALID_TRANSITION,
            "the last milestone can be released only from a DELIVERED escrow",
        )
    return settlement_request(
        state, SettlementKind.RELEASE, "MILESTONE_RELEASE", context, milestone=found
    )


def resume_settlement(
    state: Escrow,
    cmd: ResumeSettlement,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    """The awaiting release, requested again (same settlement) to the now-ACTIVE account."""
    settlement = state.settlement
    assert settlement is not None  # guaranteed by check_settlement_state
    destination = seller_payout(state, context)
    if destination is None:
        return Refusal(
            RejectionCode.INVALID_TRANSITION,
            f"seller {state.seller_id} has no ACTIVE payout account for {state.rail.value}",
        )
    same = {
        name: getattr(settlement, name)
        for name in SettlementRequestedData.model_fields
        if name in type(settlement).model_fields
    }
    same.update(status=SettlementStatus.PENDING, destination=destination)
    return SettlementRequestedData(**same)
