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

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from . import rules, settlement_rules
from ._model import WIRE_CONTEXT, fits_text, trusted
from .commands import (
    CancelEscrow,
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
    CommandRecord,
    Escrow,
    is_allowed_transition,
)
from .event_data import EscrowCreatedData, EventData
from .events import DATA_FOR_TYPE, EVENT_FOR_DATA, EVENT_TYPES, Event, event_id_for
from .evolve import EventMeta, apply_event
from .guards import (
    check_amount_within_max,
    check_creator_authorized,
    check_kyc_verified,
    check_milestones_enabled,
    check_no_open_chargeback,
    check_sender_authorized,
    check_settlement_matches,
    check_settlement_state,
    check_settlement_status,
    check_status_allows,
    is_repeated_chargeback,
    is_repeated_funds_confirmation,
)
from .money import policy_fee
from .rejections import Refusal, RejectedPayment, Rejection, RejectionCode
from .rules import Rule
from .settings import DecisionContext, DomainSettings

_DEFAULT_SETTINGS = DomainSettings()
#: The event type name of each data class.
_EVENT_TYPE_FOR_DATA: dict[type[EventData], str] = {
    data_cls: event_cls.model_fields["type"].default
    for data_cls, event_cls in EVENT_FOR_DATA.items()
}


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
    fields: dict[str, Any] = {
        "command_id": command.command_id,
        "type": command.type,
        "escrow_id": command.escrow_id,
        "code": refusal.code,
        "message": refusal.message,
        "rejected_at": now,
        "correlation_id": command.correlation_id,
        "trace_id": command.trace_id,
        "payment": _rejected_payment(command),
    }
    # all but the message come from the validated command (and ``now``, checked aware): a
    # message within ``Text`` needs no validation; any other is validated, and refused, as
    # it always was
    if fits_text(refusal.message):
        return Decision(rejection=trusted(Rejection, **fields))
    return Decision(rejection=Rejection(**fields))


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
    version = 1 if state is None else state.version + 1
    meta = EventMeta(
        event_id=event_id_for(command.escrow_id, version),
        type=_EVENT_TYPE_FOR_DATA[type(data)],
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
    """The event envelope, built without validating again (``_model.trusted``): every field
    comes from the validated command, the decision's data or the snapshot evolve built."""
    event = trusted(
        EVENT_TYPES[meta.type],
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
    # the payload's fields, validated by parse_command, within the data's bounds (the policy
    # fee is at most the amount; now plus days), so not validated again
    data = trusted(
        EscrowCreatedData,
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


# --- the rule of each command (domain/rules.py, domain/settlement_rules.py) -------------

_RULES: dict[type[Any], Rule] = {
    RecordPaymentInstructions: rules.record_instructions,
    ConfirmFunds: rules.confirm_funds,
    RecordPaymentFailure: rules.record_payment_failure,
    CancelEscrow: rules.cancel,
    MarkDelivered: rules.mark_delivered,
    ReleaseFunds: settlement_rules.release,
    RaiseDispute: rules.raise_dispute,
    ResolveDispute: settlement_rules.resolve_dispute,
    RefundEscrow: settlement_rules.refund,
    ConfirmSettlement: settlement_rules.confirm_settlement,
    RecordSettlementFailure: settlement_rules.record_settlement_failure,
    DeliverMilestone: rules.deliver_milestone,
    ReleaseMilestone: settlement_rules.release_milestone,
    ResumeSettlement: settlement_rules.resume_settlement,
    OpenChargeback: rules.open_chargeback,
    CloseChargeback: rules.close_chargeback,
}
