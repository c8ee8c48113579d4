"""decide(state, command, now) -> Decision: the pure command handler of the escrow.

Checks run in this order; the first that fails decides the rejection code:

1. no state: CreateEscrow is decided as a creation, anything else is NOT_FOUND;
   the command's escrowId must match the state's (VALIDATION_FAILED otherwise);
2. duplicate commandId remembered by the escrow: its recorded events are re-emitted
   (`Decision.duplicate`), nothing changes — unless its type or payload differ from the
   remembered command's (fingerprint): COMMAND_ID_REUSED; CreateEscrow with a new
   commandId on an existing escrow: ALREADY_EXISTS;
3. NOT_AUTHORIZED: the actor (and, for CancelEscrow/RefundEscrow/ReleaseFunds, the reason
   it gives) may not send this command to this escrow;
4. ConfirmFunds for the provider payment that already funded the escrow, OpenChargeback for
   the dispute already recorded, CloseChargeback repeating its recorded outcome: accepted
   no-op;
5. CHARGEBACK_OPEN: a chargeback is open and the command would start a release, refund or
   settlement (ReleaseFunds, ResolveDispute, RefundEscrow, ReleaseMilestone,
   ResumeSettlement, timeouts included);
6. SETTLEMENT_PENDING: a settlement is pending and this is not its result (nor the card
   network's OpenChargeback / CloseChargeback, which always act); a result
   (ConfirmSettlement, RecordSettlementFailure) that names another settlement than the
   pending one, or comes when none is pending, is SETTLEMENT_MISMATCH; a settlement
   awaiting the seller's payout account takes only ResumeSettlement (results:
   INVALID_TRANSITION), or an admin's refund, which replaces it;
7. INVALID_TRANSITION: the escrow's status does not allow the command (OpenChargeback needs
   a funded escrow: not AWAIT_FUNDS or CANCELLED; a second dispute id, or closing another
   one than recorded, is refused too);
8. FEATURE_DISABLED, then DEADLINE_NOT_REACHED (timeouts), then KYC_REQUIRED (creation
   and every release: ReleaseFunds, ReleaseMilestone, ResolveDispute RELEASE);
9. payload against state: VALIDATION_FAILED (provider/rail, maximum amount, unknown
   milestone), AMOUNT_MISMATCH (also a COMPLIANCE_REJECTED cancellation whose flagged
   deposit would not fund the escrow: that deposit is frozen alone), then milestone-level
   INVALID_TRANSITION.

A rejected ConfirmFunds carries the payment it reported (``Rejection.payment``): money no
escrow accepted, which the unmatched-funds agent records and returns.

For CreateEscrow: NOT_AUTHORIZED, FEATURE_DISABLED (milestones), KYC_REQUIRED, then
VALIDATION_FAILED (maximum amount).

Every accepted command produces at most one event.

Where a settlement pays is decided when it is requested (SPEC §10): a RELEASE pays the
seller's ACTIVE payout account for the escrow's rail, given by the caller in
``DecisionContext.seller_payout``; without one the settlement is recorded
AWAITING_PAYOUT_ACCOUNT with no destination, and ResumeSettlement (sent once the account is
ACTIVE, with the account again in the context) records the destination and requests the same
settlement again, PENDING.  A REFUND pays the buyer: the PaymentIntent's card (Stripe), or
``buyerWalletAddress``, else the deposit's sender (USDC).

Chargebacks (SPEC §10, Stripe only): OpenChargeback records ``ChargebackOpened``; what the
held funds do not cover (all of it once RELEASED or REFUNDED) is booked as a receivable of
the party that got the money (``ledger.chargeback_receivable``); the status never changes.
CloseChargeback WON → ``ChargebackClosed`` (receivable reversed; the escrow continues, a
held settlement is sent again).  LOST on an escrow still holding funds → ``EscrowRefunded``
with reason CHARGEBACK and the dispute id as reference (the network refunded the buyer; a
pending settlement is cleared and no refund is ever sent); LOST once the funds have left →
``ChargebackClosed``, the receivable stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ._model import WIRE_CONTEXT
from .commands import (
    CHARGEBACK_REASON,
    CancelEscrow,
    ChargebackOutcome,
    CloseChargeback,
    Command,
    ConfirmFunds,
    ConfirmSettlement,
    CreateEscrow,
    DeliverMilestone,
    MarkDelivered,
    OpenChargeback,
    RaiseDispute,
    RecordPaymentFailure,
    RecordPaymentInstructions,
    RecordSettlementFailure,
    RefundEscrow,
    ReleaseFunds,
    ReleaseMilestone,
    ResolveDispute,
    ResumeSettlement,
    command_fingerprint,
)
from .escrow import (
    SETTLED_MILESTONE_STATUSES,
    TERMINAL_STATUSES,
    CommandRecord,
    Escrow,
    EscrowStatus,
    Milestone,
    MilestoneStatus,
    SettlementKind,
    is_allowed_transition,
)
from .events import (
    DATA_FOR_TYPE,
    EVENT_FOR_DATA,
    EVENT_TYPES,
    ChargebackClosedData,
    ChargebackOpenedData,
    EscrowCancelledData,
    EscrowCreatedData,
    EscrowDeliveredData,
    EscrowDisputedData,
    EscrowFundsHeldData,
    EscrowRefundedData,
    EscrowReleasedData,
    Event,
    EventData,
    MilestoneDeliveredData,
    MilestoneReleasedData,
    PaymentFailedData,
    PaymentInstructionsRecordedData,
    SettlementFailedData,
    SettlementRequestedData,
    event_id_for,
)
from .evolve import EventMeta, apply_event
from .guards import (
    actor_relation,
    check_amount_within_max,
    check_creator_authorized,
    check_deadline_reached,
    check_delivered_timeout_enabled,
    check_flagged_deposit_funds,
    check_funds_match,
    check_kyc_verified,
    check_milestone_status,
    check_milestones_enabled,
    check_no_open_chargeback,
    check_provider_matches_rail,
    check_sender_authorized,
    check_settlement_amount,
    check_settlement_matches,
    check_settlement_state,
    check_settlement_status,
    check_status_allows,
    find_milestone_or_refusal,
    is_repeated_chargeback,
    is_repeated_funds_confirmation,
    is_system_timeout,
)
from .ledger import chargeback_receivable
from .money import RAIL_PROVIDER, Rail, policy_fee, release_fee
from .payouts import (
    BuyerDestination,
    PayoutDestination,
    SettlementStatus,
    WalletDestination,
    fits_rail,
)
from .rejections import Refusal, RejectedPayment, Rejection, RejectionCode
from .settings import DecisionContext, DomainSettings

_DEFAULT_SETTINGS = DomainSettings()


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of deciding one command: events (possibly none) or a rejection."""

    events: list[Event] = field(default_factory=list)
    rejection: Rejection | None = None
    #: True when the command was already decided and its recorded events are re-emitted.
    duplicate: bool = False

    @property
    def accepted(self) -> bool:
        """True unless the command was rejected."""
        return self.rejection is None

    def state_after(self, state: Escrow | None) -> Escrow | None:
        """The escrow after this decision (the last event's snapshot, else `state`)."""
        if self.events and not self.duplicate:
            return self.events[-1].escrow
        return state


def decide(
    state: Escrow | None,
    command: Command,
    now: datetime,
    settings: DomainSettings = _DEFAULT_SETTINGS,
    context: DecisionContext | None = None,
) -> Decision:
    """Decide `command` against `state` at `now`; never raises for a business rule."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if state is None:
        if isinstance(command, CreateEscrow):
            return _decide_create(command, now, settings, context)
        return _reject(command, now, Refusal(RejectionCode.NOT_FOUND, "escrow not found"))
    if command.escrow_id != state.escrow_id:
        return _reject(
            command,
            now,
            Refusal(RejectionCode.VALIDATION_FAILED, "command escrowId differs from the state"),
        )
    record = state.find_command(command.command_id)
    if record is not None:
        if record.fingerprint not in (None, command_fingerprint(command)):
            return _reject(
                command,
                now,
                Refusal(
                    RejectionCode.COMMAND_ID_REUSED,
                    f"commandId {command.command_id} was used before with another payload",
                ),
            )
        return _replay(state, record)
    if isinstance(command, CreateEscrow):
        return _reject(command, now, Refusal(RejectionCode.ALREADY_EXISTS, "escrow already exists"))
    refusal = check_sender_authorized(state, command)
    if refusal is not None:
        return _reject(command, now, refusal)
    if is_repeated_funds_confirmation(state, command) or is_repeated_chargeback(state, command):
        return Decision()
    refusal = (
        check_no_open_chargeback(state, command)
        or check_settlement_state(state, command)
        or check_settlement_matches(state, command)
        or check_settlement_status(state, command)
        or check_status_allows(state, command)
    )
    if refusal is not None:
        return _reject(command, now, refusal)
    rule = _RULES[type(command)]
    outcome = rule(state, command, now, settings, context)
    if isinstance(outcome, Refusal):
        return _reject(command, now, outcome)
    return Decision(events=[_emit(state, command, now, outcome)])


# --- building decisions -----------------------------------------------------------------


def _reject(command: Command, now: datetime, refusal: Refusal) -> Decision:
    rejection = Rejection(
        command_id=command.command_id,
        type=command.type,
        escrow_id=command.escrow_id,
        code=refusal.code,
        message=refusal.message,
        rejected_at=now,
        correlation_id=command.correlation_id,
        trace_id=command.trace_id,
        payment=_rejected_payment(command),
    )
    return Decision(rejection=rejection)


def _rejected_payment(command: Command) -> RejectedPayment | None:
    """The money a refused ConfirmFunds reported (the unmatched-funds agent returns it)."""
    if not isinstance(command, ConfirmFunds):
        return None
    p = command.payload
    return RejectedPayment(
        provider=p.provider,
        provider_payment_id=p.provider_payment_id,
        amount=p.amount,
        currency=p.currency,
        sender_address=p.sender_address,
    )


def _emit(state: Escrow | None, command: Command, now: datetime, data: EventData) -> Event:
    """Build the event for `data`, with the snapshot it leads to."""
    cls = EVENT_FOR_DATA[type(data)]
    version = 1 if state is None else state.version + 1
    meta = EventMeta(
        event_id=event_id_for(command.escrow_id, version),
        type=cls.model_fields["type"].default,
        escrow_id=command.escrow_id,
        version=version,
        occurred_at=now,
        causation_id=command.command_id,
        correlation_id=command.correlation_id or command.command_id,
        trace_id=command.trace_id,
        actor=command.actor,
        command_fingerprint=command_fingerprint(command),
    )
    after = apply_event(state, meta, data)
    if state is not None and not is_allowed_transition(state.status, after.status):
        raise RuntimeError(f"bug: {state.status} -> {after.status} is not in the seed table")
    return _event(meta, data, after)


def _event(meta: EventMeta, data: EventData, snapshot: Escrow) -> Event:
    cls = EVENT_TYPES[meta.type]
    event = cls.model_construct(
        schema_version=1,
        event_id=meta.event_id,
        type=meta.type,
        escrow_id=meta.escrow_id,
        version=meta.version,
        occurred_at=meta.occurred_at,
        causation_id=meta.causation_id,
        correlation_id=meta.correlation_id,
        trace_id=meta.trace_id,
        actor=meta.actor,
        command_fingerprint=meta.command_fingerprint,
        data=data,
        escrow=snapshot,
    )
    return event  # type: ignore[return-value]


def _replay(state: Escrow, record: CommandRecord) -> Decision:
    """Re-emit a recorded command's events (same ids, versions, data; current snapshot)."""
    events: list[Event] = []
    for rec in record.events:
        data = DATA_FOR_TYPE[rec.type].model_validate(rec.data, context=WIRE_CONTEXT)
        meta = EventMeta(
            event_id=rec.event_id,
            type=rec.type,
            escrow_id=state.escrow_id,
            version=rec.version,
            occurred_at=rec.occurred_at,
            causation_id=rec.causation_id,
            correlation_id=rec.correlation_id,
            trace_id=rec.trace_id,
            actor=rec.actor,
            command_fingerprint=record.fingerprint,
        )
        events.append(_event(meta, data, state))
    return Decision(events=events, duplicate=True)


# --- creation ---------------------------------------------------------------------------


def _decide_create(
    command: CreateEscrow,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> Decision:
    p = command.payload
    refusal = (
        check_creator_authorized(command)
        or check_milestones_enabled(settings, bool(p.milestones))
        or check_kyc_verified(settings, context, (p.buyer_id, p.seller_id))
        or check_amount_within_max(settings, p.rail, p.currency, p.amount)
    )
    if refusal is not None:
        return _reject(command, now, refusal)
    data = EscrowCreatedData(
        offer_id=p.offer_id,
        contract_id=p.contract_id,
        buyer_id=p.buyer_id,
        seller_id=p.seller_id,
        rail=p.rail,
        currency=p.currency,
        amount=p.amount,
        seller_fee=p.seller_fee
        if p.seller_fee is not None
        else policy_fee(p.amount, settings.fee_bps),
        seller_account_id=p.seller_account_id,
        buyer_wallet_address=p.buyer_wallet_address,
        milestones=p.milestones,
        expires_at=now + timedelta(days=settings.payment_deadline_days),
        recent_commands_max=settings.recent_commands_max,
    )
    return Decision(events=[_emit(None, command, now, data)])


# --- rules per command (status, authorization and pending settlement already checked) ---

RuleResult = EventData | Refusal
Rule = Callable[[Escrow, Any, datetime, DomainSettings, DecisionContext | None], RuleResult]


def _record_instructions(
    state: Escrow,
    cmd: RecordPaymentInstructions,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    p = cmd.payload
    return check_provider_matches_rail(state, p.provider) or PaymentInstructionsRecordedData(
        provider=p.provider,
        provider_payment_id=p.provider_payment_id,
        deposit_address=p.deposit_address,
    )


def _confirm_funds(
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
        or EscrowFundsHeldData(
            provider=p.provider,
            provider_payment_id=p.provider_payment_id,
            amount=p.amount,
            currency=p.currency,
            sender_address=p.sender_address,
        )
    )


def _record_payment_failure(
    state: Escrow,
    cmd: RecordPaymentFailure,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    p = cmd.payload
    return check_provider_matches_rail(state, p.provider) or PaymentFailedData(
        provider=p.provider,
        provider_payment_id=p.provider_payment_id,
        error_code=p.error_code,
        error_message=p.error_message,
    )


def _cancel(
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
    return EscrowCancelledData(reason=cmd.payload.reason)


def _mark_delivered(
    state: Escrow,
    cmd: MarkDelivered,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    return EscrowDeliveredData(
        note=cmd.payload.note,
        evidence_keys=cmd.payload.evidence_keys,
        auto_refund_at=now + timedelta(days=settings.auto_refund_deadline_days),
    )


def _delivered_timeout(
    state: Escrow, now: datetime, settings: DomainSettings, action: str
) -> Refusal | None:
    return check_delivered_timeout_enabled(settings, action) or check_deadline_reached(
        state.auto_refund_at, now, "auto-refund deadline"
    )


def _seller_payout(state: Escrow, context: DecisionContext | None) -> PayoutDestination | None:
    """The seller's ACTIVE payout account for the escrow's rail, when the caller found one."""
    destination = context.seller_payout if context is not None else None
    return destination if fits_rail(destination, state.rail) else None


def _refund_destination(state: Escrow) -> PayoutDestination | None:
    """The buyer: the card (Stripe), else the given wallet or the deposit's sender (USDC)."""
    if state.rail == Rail.STRIPE:
        return BuyerDestination()
    payment = state.payment
    address = state.buyer_wallet_address or (payment.sender_address if payment else None)
    return WalletDestination(address=address) if address else None


def _settlement_request(
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
        destination = _seller_payout(state, context)
        if destination is None:
            status = SettlementStatus.AWAITING_PAYOUT_ACCOUNT
    else:
        destination = _refund_destination(state)
    return SettlementRequestedData(
        kind=kind,
        attempt=state.settlement_attempts + 1,
        reason=reason,
        milestone_id=milestone.milestone_id if milestone is not None else None,
        amount=amount,
        payout_amount=amount - fee,
        fee_amount=fee,
        resolution=resolution,
        status=status,
        destination=destination,
    )


def _release(
    state: Escrow,
    cmd: ReleaseFunds,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    if is_system_timeout(cmd):
        refusal = _delivered_timeout(state, now, settings, "release")
        if refusal is not None:
            return refusal
    refusal = check_kyc_verified(settings, context, (state.buyer_id, state.seller_id))
    if refusal is not None:
        return refusal
    reason = cmd.payload.reason or f"RELEASED_BY_{actor_relation(state, cmd.actor).upper()}"
    return _settlement_request(state, SettlementKind.RELEASE, reason, context)


def _raise_dispute(
    state: Escrow,
    cmd: RaiseDispute,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    return EscrowDisputedData(reason=cmd.payload.reason, evidence_keys=cmd.payload.evidence_keys)


def _resolve_dispute(
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
    return _settlement_request(state, p.resolution, p.reason, context, resolution=p.resolution)


def _refund(
    state: Escrow,
    cmd: RefundEscrow,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    if is_system_timeout(cmd):
        refusal = _delivered_timeout(state, now, settings, "refund")
        if refusal is not None:
            return refusal
    return _settlement_request(state, SettlementKind.REFUND, cmd.payload.reason, context)


def _confirm_settlement(
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
        return MilestoneReleasedData(
            milestone_id=settlement.milestone_id,
            provider=p.provider,
            provider_reference=p.provider_reference,
            attempt=settlement.attempt,
            amount=settlement.amount,
            payout_amount=settlement.payout_amount,
            fee_amount=settlement.fee_amount,
        )
    if settlement.kind == SettlementKind.RELEASE:
        return EscrowReleasedData(
            provider=p.provider,
            provider_reference=p.provider_reference,
            attempt=settlement.attempt,
            amount=settlement.amount,
            payout_amount=settlement.payout_amount,
            fee_amount=settlement.fee_amount,
        )
    return EscrowRefundedData(
        provider=p.provider,
        provider_reference=p.provider_reference,
        attempt=settlement.attempt,
        amount=settlement.amount,
    )


def _record_settlement_failure(
    state: Escrow,
    cmd: RecordSettlementFailure,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    settlement = state.settlement
    assert settlement is not None  # guaranteed by check_settlement_state
    p = cmd.payload
    return SettlementFailedData(
        kind=settlement.kind,
        attempt=settlement.attempt,
        milestone_id=settlement.milestone_id,
        error_code=p.error_code,
        error_message=p.error_message,
        retryable=p.retryable,
    )


def _deliver_milestone(
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
    return MilestoneDeliveredData(
        milestone_id=found.milestone_id,
        escrow_delivered=escrow_delivered,
        auto_refund_at=(
            now + timedelta(days=settings.auto_refund_deadline_days) if escrow_delivered else None
        ),
    )


def _release_milestone(
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
    return _settlement_request(
        state, SettlementKind.RELEASE, "MILESTONE_RELEASE", context, milestone=found
    )


def _resume_settlement(
    state: Escrow,
    cmd: ResumeSettlement,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> RuleResult:
    """The awaiting release, requested again (same settlement) to the now-ACTIVE account."""
    settlement = state.settlement
    assert settlement is not None  # guaranteed by check_settlement_state
    destination = _seller_payout(state, context)
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


def _open_chargeback(
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
    return ChargebackOpenedData(
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


def _close_chargeback(
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
        return EscrowRefundedData(
            provider=RAIL_PROVIDER[state.rail],
            provider_reference=p.dispute_id,
            attempt=max(attempt, state.settlement_attempts, 1),
            amount=holding,
            reason=CHARGEBACK_REASON,
        )
    if not lost:
        return ChargebackClosedData(
            dispute_id=p.dispute_id,
            outcome=p.outcome,
            amount=p.amount,
            reversed_amount=chargeback.receivable_amount,
        )
    # funds that left while it was open (a settlement confirmed meanwhile) are owed too
    uncovered, account = chargeback_receivable(state, chargeback.amount)
    top_up = max(0, uncovered - chargeback.receivable_amount)
    return ChargebackClosedData(
        dispute_id=p.dispute_id,
        outcome=p.outcome,
        amount=p.amount,
        booked_amount=top_up,
        booked_account=(chargeback.receivable_account or account) if top_up else None,
    )


_RULES: dict[type[Any], Rule] = {
    RecordPaymentInstructions: _record_instructions,
    ConfirmFunds: _confirm_funds,
    RecordPaymentFailure: _record_payment_failure,
    CancelEscrow: _cancel,
    MarkDelivered: _mark_delivered,
    ReleaseFunds: _release,
    RaiseDispute: _raise_dispute,
    ResolveDispute: _resolve_dispute,
    RefundEscrow: _refund,
    ConfirmSettlement: _confirm_settlement,
    RecordSettlementFailure: _record_settlement_failure,
    DeliverMilestone: _deliver_milestone,
    ReleaseMilestone: _release_milestone,
    ResumeSettlement: _resume_settlement,
    OpenChargeback: _open_chargeback,
    CloseChargeback: _close_chargeback,
}
