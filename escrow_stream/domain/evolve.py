"""evolve(state, event) -> state: the only place escrow state changes, one event at a time.

One handler per event type, all here on purpose: a reader checks every change an event makes
to the escrow (and the ledger it posts) in one file, which is why it runs past 400 lines.

The new snapshot is built without validating again (``_model.trusted`` and ``replaced``,
issue 13): its values are the state's (validated when loaded or built), the event's data and
envelope (validated by ``parse_event``, or built by ``decide`` from a validated command), or
simple derivations of them within the same bounds.  The one derived value that could leave
its bounds, a settlement id built from a long escrowId, is still validated (``Settlement``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from ._model import ID_LENGTH_MAX, replaced, trusted
from .escrow import (
    SETTLED_MILESTONE_STATUSES,
    Actor,
    Chargeback,
    ChargebackStatus,
    CommandRecord,
    Dispute,
    Escrow,
    EscrowStatus,
    EventRecord,
    Milestone,
    MilestoneStatus,
    Payment,
    Settlement,
    SettlementKind,
    settlement_id_for,
)
from .event_data import (
    ChargebackClosedData,
    ChargebackOpenedData,
    EscrowCancelledData,
    EscrowCreatedData,
    EscrowDeliveredData,
    EscrowDisputedData,
    EscrowFundsHeldData,
    EscrowRefundedData,
    EscrowReleasedData,
    EventData,
    MilestoneDeliveredData,
    MilestoneReleasedData,
    PaymentFailedData,
    PaymentInstructionsRecordedData,
    SettlementFailedData,
    SettlementRequestedData,
)
from .events import Event
from .ledger import chargeback_posting, funds_held_posting, refund_posting, release_posting
from .payloads import CHARGEBACK_REASON


class EvolveError(ValueError):
    """An event that cannot follow the given state (wrong escrow, version gap, no state)."""


class EventMeta(NamedTuple):
    """Envelope fields of an event, apart from its data and snapshot."""

    event_id: str
    type: str
    escrow_id: str
    version: int
    occurred_at: datetime
    causation_id: str
    correlation_id: str
    trace_id: str | None
    actor: Actor
    #: the causing command's fingerprint, remembered with its events
    command_fingerprint: str | None = None


def meta_of(event: Event) -> EventMeta:
    """The envelope fields of `event`."""
    return EventMeta(
        event_id=event.event_id,
        type=event.type,
        escrow_id=event.escrow_id,
        version=event.version,
        occurred_at=event.occurred_at,
        causation_id=event.causation_id,
        correlation_id=event.correlation_id,
        trace_id=event.trace_id,
        actor=event.actor,
        command_fingerprint=event.command_fingerprint,
    )


def evolve(state: Escrow | None, event: Event) -> Escrow:
    """The escrow after `event`; folding all events of an escrow from None rebuilds it."""
    return apply_event(state, meta_of(event), event.data)


def apply_event(state: Escrow | None, meta: EventMeta, data: EventData) -> Escrow:
    """Apply one event given as envelope fields and data (used by evolve and by decide)."""
    if isinstance(data, EscrowCreatedData):
        if state is not None:
            raise EvolveError(f"escrow {meta.escrow_id} already exists")
        if meta.version != 1:
            raise EvolveError("EscrowCreated must be version 1")
        created = _created(meta, data)
        return replaced(created, {"recent_commands": _remember(created, meta, data)})
    if state is None:
        raise EvolveError(f"{meta.type} for unknown escrow {meta.escrow_id}")
    if meta.escrow_id != state.escrow_id:
        raise EvolveError(f"event of escrow {meta.escrow_id} applied to {state.escrow_id}")
    if meta.version != state.version + 1:
        raise EvolveError(f"version {meta.version} does not follow {state.version}")
    handler = _HANDLERS.get(type(data))
    if handler is None:
        raise EvolveError(f"no handler for {type(data).__name__}")
    update = handler(state, meta, data)
    update["version"] = meta.version
    update["updated_at"] = meta.occurred_at
    update["recent_commands"] = _remember(state, meta, data)
    return replaced(state, update)


def _remember(state: Escrow, meta: EventMeta, data: EventData) -> tuple[CommandRecord, ...]:
    """Record the event under its command; keep only the newest `recent_commands_max`."""
    record = trusted(
        EventRecord,
        event_id=meta.event_id,
        type=meta.type,
        version=meta.version,
        occurred_at=meta.occurred_at,
        causation_id=meta.causation_id,
        correlation_id=meta.correlation_id,
        trace_id=meta.trace_id,
        actor=meta.actor,
        data=data.__pydantic_serializer__.to_python(data, mode="json", by_alias=True),
    )
    records = state.recent_commands
    if records and records[-1].command_id == meta.causation_id:
        last = records[-1]
        merged = replaced(last, {"events": (*last.events, record)})
        records = (*records[:-1], merged)
    else:
        first = trusted(
            CommandRecord,
            command_id=meta.causation_id,
            events=(record,),
            fingerprint=meta.command_fingerprint,
        )
        records = (*records, first)
    overflow = len(records) - state.recent_commands_max
    return records[overflow:] if overflow > 0 else records


def _created(meta: EventMeta, data: EscrowCreatedData) -> Escrow:
    return trusted(
        Escrow,
        escrow_id=meta.escrow_id,
        offer_id=data.offer_id,
        contract_id=data.contract_id,
        buyer_id=data.buyer_id,
        seller_id=data.seller_id,
        rail=data.rail,
        currency=data.currency,
        amount=data.amount,
        seller_fee=data.seller_fee,
        seller_account_id=data.seller_account_id,
        buyer_wallet_address=data.buyer_wallet_address,
        status=EscrowStatus.AWAIT_FUNDS,
        version=1,
        created_at=meta.occurred_at,
        updated_at=meta.occurred_at,
        expires_at=data.expires_at,
        milestones=tuple(
            trusted(Milestone, milestone_id=m.milestone_id, title=m.title, amount=m.amount)
            for m in data.milestones
        ),
        recent_commands_max=data.recent_commands_max,
    )


Update = dict[str, Any]
D = TypeVar("D", bound=EventData)


def _payment(state: Escrow, **changes: Any) -> Payment:
    if state.payment is None:
        return trusted(Payment, **changes)
    return replaced(state.payment, changes)


def _instructions(state: Escrow, meta: EventMeta, data: PaymentInstructionsRecordedData) -> Update:
    payment = _payment(
        state,
        provider=data.provider,
        provider_payment_id=data.provider_payment_id,
        deposit_address=data.deposit_address,
    )
    return {"payment": payment}


def _funds_held(state: Escrow, meta: EventMeta, data: EscrowFundsHeldData) -> Update:
    payment = _payment(
        state,
        provider=data.provider,
        funded_provider_payment_id=data.provider_payment_id,
        sender_address=data.sender_address,
        funded_at=meta.occurred_at,
    )
    posting = funds_held_posting(state, meta.event_id, meta.occurred_at, data.provider, data.amount)
    return {
        "status": EscrowStatus.FUNDS_HELD,
        "funded_amount": data.amount,
        "payment": payment,
        "ledger": (*state.ledger, posting),
    }


def _payment_failed(state: Escrow, meta: EventMeta, data: PaymentFailedData) -> Update:
    failures = state.payment.failure_count if state.payment else 0
    payment = _payment(
        state,
        provider=data.provider,
        failure_count=failures + 1,
        last_error_code=data.error_code,
        last_error_message=data.error_message,
    )
    return {"payment": payment}


def _cancelled(state: Escrow, meta: EventMeta, data: EscrowCancelledData) -> Update:
    return {"status": EscrowStatus.CANCELLED, "cancellation_reason": data.reason.value}


def _delivered(state: Escrow, meta: EventMeta, data: EscrowDeliveredData) -> Update:
    return {"status": EscrowStatus.DELIVERED, "auto_refund_at": data.auto_refund_at}


def _disputed(state: Escrow, meta: EventMeta, data: EscrowDisputedData) -> Update:
    dispute = trusted(
        Dispute,
        raised_by=meta.actor,
        reason=data.reason,
        raised_at=meta.occurred_at,
        evidence_keys=data.evidence_keys,
        previous_status=state.status,
    )
    return {"status": EscrowStatus.DISPUTED, "dispute": dispute}


def _settlement_requested(state: Escrow, meta: EventMeta, data: SettlementRequestedData) -> Update:
    resumed = state.settlement  # a settlement requested again once its payout account is ACTIVE
    settlement_id = settlement_id_for(meta.escrow_id, data.kind, data.milestone_id, data.attempt)
    fields = {
        "settlement_id": settlement_id,
        "kind": data.kind,
        "requested_at": meta.occurred_at,
        "attempt": data.attempt,
        "reason": data.reason,
        "previous_status": resumed.previous_status if resumed is not None else state.status,
        "milestone_id": data.milestone_id,
        "amount": data.amount,
        "payout_amount": data.payout_amount,
        "fee_amount": data.fee_amount,
        "status": data.status,
        "destination": data.destination,
    }
    # the settlement id is the only field not taken as is from validated data: an id of a
    # long escrowId can exceed ID_LENGTH_MAX, and is then refused by validation, as always
    settlement = (
        trusted(Settlement, **fields)
        if len(settlement_id) <= ID_LENGTH_MAX
        else Settlement(**fields)
    )
    update: Update = {"settlement": settlement, "settlement_attempts": data.attempt}
    if data.kind == SettlementKind.RELEASE and data.milestone_id is None:
        update["release_approved_at"] = state.release_approved_at or meta.occurred_at
    if data.resolution is not None and state.dispute is not None:
        update["dispute"] = replaced(
            state.dispute,
            {
                "resolution": data.resolution,
                "resolution_reason": data.reason,
                "resolved_at": meta.occurred_at,
            },
        )
    return update


def _settlement_failed(state: Escrow, meta: EventMeta, data: SettlementFailedData) -> Update:
    return {"settlement": None}


def _settle_open_milestones(
    state: Escrow, status: MilestoneStatus, at: datetime
) -> tuple[Milestone, ...]:
    return tuple(
        m
        if m.status in SETTLED_MILESTONE_STATUSES
        else replaced(m, {"status": status, "settled_at": at})
        for m in state.milestones
    )


def _released(state: Escrow, meta: EventMeta, data: EscrowReleasedData) -> Update:
    posting = release_posting(state, meta.event_id, meta.occurred_at, data.amount, data.fee_amount)
    return {
        "status": EscrowStatus.RELEASED,
        "settlement": None,
        "released_amount": state.released_amount + data.amount,
        "fee_amount": state.fee_amount + data.fee_amount,
        "milestones": _settle_open_milestones(state, MilestoneStatus.RELEASED, meta.occurred_at),
        "ledger": (*state.ledger, posting),
    }


def _refunded(state: Escrow, meta: EventMeta, data: EscrowRefundedData) -> Update:
    by_chargeback = data.reason == CHARGEBACK_REASON
    posting = refund_posting(
        state, meta.event_id, meta.occurred_at, data.amount, chargeback=by_chargeback
    )
    update: Update = {
        "status": EscrowStatus.REFUNDED,
        "settlement": None,
        "refunded_amount": state.refunded_amount + data.amount,
        "milestones": _settle_open_milestones(state, MilestoneStatus.REFUNDED, meta.occurred_at),
        "ledger": (*state.ledger, posting),
    }
    if by_chargeback and state.chargeback is not None:  # lost: the network refunded the buyer
        update["chargeback"] = replaced(
            state.chargeback, {"status": ChargebackStatus.LOST, "closed_at": meta.occurred_at}
        )
    return update


def _chargeback_opened(state: Escrow, meta: EventMeta, data: ChargebackOpenedData) -> Update:
    chargeback = trusted(
        Chargeback,
        dispute_id=data.dispute_id,
        status=ChargebackStatus.OPEN,
        amount=data.amount,
        reason=data.reason,
        opened_at=meta.occurred_at,
        charge_id=data.charge_id,
        payment_intent_id=data.payment_intent_id,
        receivable_amount=data.receivable_amount,
        receivable_account=data.receivable_account,
    )
    update: Update = {"chargeback": chargeback}
    if data.receivable_amount and data.receivable_account:
        posting = chargeback_posting(
            state,
            meta.event_id,
            meta.occurred_at,
            data.receivable_account,
            data.receivable_amount,
            reverse=False,
        )
        update["ledger"] = (*state.ledger, posting)
    return update


def _chargeback_closed(state: Escrow, meta: EventMeta, data: ChargebackClosedData) -> Update:
    chargeback = state.chargeback
    if chargeback is None or chargeback.dispute_id != data.dispute_id:
        raise EvolveError(f"no chargeback {data.dispute_id} to close")
    changes: Update = {
        "status": ChargebackStatus(data.outcome.value),
        "closed_at": meta.occurred_at,
    }
    update: Update = {}
    if data.reversed_amount and chargeback.receivable_account:
        posting = chargeback_posting(
            state,
            meta.event_id,
            meta.occurred_at,
            chargeback.receivable_account,
            data.reversed_amount,
            reverse=True,
        )
        update["ledger"] = (*state.ledger, posting)
    elif data.booked_amount and data.booked_account:
        posting = chargeback_posting(
            state, meta.event_id, meta.occurred_at, data.booked_account, data.booked_amount, False
        )
        update["ledger"] = (*state.ledger, posting)
        changes["receivable_amount"] = chargeback.receivable_amount + data.booked_amount
        changes["receivable_account"] = data.booked_account
    update["chargeback"] = replaced(chargeback, changes)
    return update


def _replace_milestone(state: Escrow, milestone_id: str, **changes: Any) -> tuple[Milestone, ...]:
    if state.find_milestone(milestone_id) is None:
        raise EvolveError(f"unknown milestone {milestone_id}")
    return tuple(
        replaced(m, changes) if m.milestone_id == milestone_id else m for m in state.milestones
    )


def _milestone_delivered(state: Escrow, meta: EventMeta, data: MilestoneDeliveredData) -> Update:
    update: Update = {
        "milestones": _replace_milestone(
            state,
            data.milestone_id,
            status=MilestoneStatus.DELIVERED,
            delivered_at=meta.occurred_at,
        )
    }
    if data.escrow_delivered:
        update["status"] = EscrowStatus.DELIVERED
        update["auto_refund_at"] = data.auto_refund_at
    return update


def _milestone_released(state: Escrow, meta: EventMeta, data: MilestoneReleasedData) -> Update:
    milestones = _replace_milestone(
        state, data.milestone_id, status=MilestoneStatus.RELEASED, settled_at=meta.occurred_at
    )
    posting = release_posting(state, meta.event_id, meta.occurred_at, data.amount, data.fee_amount)
    update: Update = {
        "settlement": None,
        "milestones": milestones,
        "released_amount": state.released_amount + data.amount,
        "fee_amount": state.fee_amount + data.fee_amount,
        "ledger": (*state.ledger, posting),
    }
    if all(m.status in SETTLED_MILESTONE_STATUSES for m in milestones):
        refunded = any(m.status == MilestoneStatus.REFUNDED for m in milestones)
        update["status"] = EscrowStatus.REFUNDED if refunded else EscrowStatus.RELEASED
    return update


def _handler(fn: Callable[[Escrow, EventMeta, D], Update]) -> Callable[..., Update]:
    return fn


_HANDLERS: dict[type[EventData], Callable[..., Update]] = {
    PaymentInstructionsRecordedData: _handler(_instructions),
    EscrowFundsHeldData: _handler(_funds_held),
    PaymentFailedData: _handler(_payment_failed),
    EscrowCancelledData: _handler(_cancelled),
    EscrowDeliveredData: _handler(_delivered),
    EscrowDisputedData: _handler(_disputed),
    SettlementRequestedData: _handler(_settlement_requested),
    SettlementFailedData: _handler(_settlement_failed),
    EscrowReleasedData: _handler(_released),
    EscrowRefundedData: _handler(_refunded),
    MilestoneDeliveredData: _handler(_milestone_delivered),
    MilestoneReleasedData: _handler(_milestone_released),
    ChargebackOpenedData: _handler(_chargeback_opened),
    ChargebackClosedData: _handler(_chargeback_closed),
}
