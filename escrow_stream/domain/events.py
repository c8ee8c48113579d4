"""Events (past tense): one small frozen model per type, each with the snapshot after it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from ._model import (
    MILESTONES_MAX,
    WIRE_CONTEXT,
    EvidenceKeys,
    Id,
    ShortText,
    Text,
    Timestamp,
    TolerantModel,
)
from .commands import CancelReason, ChargebackOutcome, MilestoneSpec, validation_errors
from .escrow import Actor, Escrow, SettlementKind
from .money import Currency, MinorUnits, PositiveMinorUnits, Provider, Rail
from .payouts import PayoutDestination, SettlementStatus

#: Fixed namespace of event ids: eventId = uuid5(EVENT_ID_NAMESPACE, f"{escrowId}:{version}").
EVENT_ID_NAMESPACE = uuid.UUID("6f1c2a9e-4d3b-5e7f-8a90-1b2c3d4e5f60")


def event_id_for(escrow_id: str, version: int) -> str:
    """The deterministic id of the event that gives `escrow_id` its `version`."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{escrow_id}:{version}"))


# --- data -----------------------------------------------------------------------------


class EventData(TolerantModel):
    """Base of every event's `data`."""


class EscrowCreatedData(EventData):
    """Data of EscrowCreated."""

    offer_id: Id
    contract_id: Id
    buyer_id: Id
    seller_id: Id
    rail: Rail
    currency: Currency
    amount: PositiveMinorUnits
    seller_fee: MinorUnits = 0
    seller_account_id: Id | None = None
    buyer_wallet_address: Id | None = None
    milestones: Annotated[tuple[MilestoneSpec, ...], Field(max_length=MILESTONES_MAX)] = ()
    expires_at: Timestamp
    recent_commands_max: int = Field(ge=1)


class PaymentInstructionsRecordedData(EventData):
    """Data of PaymentInstructionsRecorded."""

    provider: Provider
    provider_payment_id: Id
    deposit_address: Id | None = None


class EscrowFundsHeldData(EventData):
    """Data of EscrowFundsHeld."""

    provider: Provider
    provider_payment_id: Id
    amount: PositiveMinorUnits
    currency: Currency
    sender_address: Id | None = None


class PaymentFailedData(EventData):
    """Data of PaymentFailed (no providerPaymentId when the provider refused to create one)."""

    provider: Provider
    provider_payment_id: Id | None = None
    error_code: ShortText
    error_message: Text


class EscrowCancelledData(EventData):
    """Data of EscrowCancelled."""

    reason: CancelReason


class EscrowDeliveredData(EventData):
    """Data of EscrowDelivered."""

    note: Text | None = None
    evidence_keys: EvidenceKeys = ()
    auto_refund_at: Timestamp


class EscrowDisputedData(EventData):
    """Data of EscrowDisputed."""

    reason: ShortText
    evidence_keys: EvidenceKeys = ()


class SettlementRequestedData(EventData):
    """Data of SettlementRequested: what the payments agent must move, and why."""

    kind: SettlementKind
    attempt: int = Field(ge=1)
    reason: ShortText
    milestone_id: Id | None = None
    amount: PositiveMinorUnits
    payout_amount: MinorUnits
    fee_amount: MinorUnits
    resolution: SettlementKind | None = None
    status: SettlementStatus = SettlementStatus.PENDING
    destination: PayoutDestination | None = None


class SettlementFailedData(EventData):
    """Data of SettlementFailed."""

    kind: SettlementKind
    attempt: int = Field(ge=1)
    milestone_id: Id | None = None
    error_code: ShortText
    error_message: Text
    retryable: bool


class EscrowReleasedData(EventData):
    """Data of EscrowReleased: the remainder went to the seller, less the fee."""

    provider: Provider
    provider_reference: Id
    attempt: int = Field(ge=1)
    amount: PositiveMinorUnits
    payout_amount: MinorUnits
    fee_amount: MinorUnits


class EscrowRefundedData(EventData):
    """Data of EscrowRefunded: the remainder went back to the buyer — by our refund, or, with
    ``reason`` CHARGEBACK, by the card network on a lost chargeback (``providerReference``
    is then the dispute id, ``attempt`` the last settlement attempt or 1, and no refund is
    ever sent for it)."""

    provider: Provider
    provider_reference: Id
    attempt: int = Field(ge=1)
    amount: PositiveMinorUnits
    reason: ShortText | None = None


class ChargebackOpenedData(EventData):
    """Data of ChargebackOpened: a card chargeback; ``receivableAmount`` (what the held funds
    do not cover) is booked against ``receivableAccount``."""

    provider: Provider
    dispute_id: Id
    charge_id: Id | None = None
    payment_intent_id: Id | None = None
    amount: PositiveMinorUnits
    currency: Currency
    reason: ShortText
    receivable_amount: MinorUnits = 0
    receivable_account: str | None = Field(default=None, min_length=1, max_length=300)


class ChargebackClosedData(EventData):
    """Data of ChargebackClosed: WON (any receivable reversed: ``reversedAmount``), or LOST
    on an escrow that no longer held the funds (the receivable stays, topped up by
    ``bookedAmount`` when funds left the escrow while the chargeback was open)."""

    dispute_id: Id
    outcome: ChargebackOutcome
    amount: MinorUnits | None = None
    reversed_amount: MinorUnits = 0
    booked_amount: MinorUnits = 0
    booked_account: str | None = Field(default=None, min_length=1, max_length=300)


class MilestoneDeliveredData(EventData):
    """Data of MilestoneDelivered; the escrow becomes DELIVERED with its last milestone."""

    milestone_id: Id
    escrow_delivered: bool = False
    auto_refund_at: Timestamp | None = None


class MilestoneReleasedData(EventData):
    """Data of MilestoneReleased; the escrow becomes RELEASED with its last milestone."""

    milestone_id: Id
    provider: Provider
    provider_reference: Id
    attempt: int = Field(ge=1)
    amount: PositiveMinorUnits
    payout_amount: MinorUnits
    fee_amount: MinorUnits


# --- envelopes ------------------------------------------------------------------------


class EventBase(TolerantModel):
    """Fields every event envelope carries."""

    schema_version: Literal[1] = 1
    event_id: Id
    type: str
    escrow_id: Id
    version: int = Field(ge=1)
    occurred_at: Timestamp
    causation_id: Id
    correlation_id: Id
    trace_id: Id | None = None
    actor: Actor
    #: ``command_fingerprint`` of the causing command (None on events from before it)
    command_fingerprint: Id | None = None
    data: EventData
    escrow: Escrow


class EscrowCreated(EventBase):
    """An escrow was opened and awaits funds."""

    type: Literal["EscrowCreated"] = "EscrowCreated"
    data: EscrowCreatedData


class PaymentInstructionsRecorded(EventBase):
    """Payment instructions were stored."""

    type: Literal["PaymentInstructionsRecorded"] = "PaymentInstructionsRecorded"
    data: PaymentInstructionsRecordedData


class EscrowFundsHeld(EventBase):
    """The buyer's funds are held."""

    type: Literal["EscrowFundsHeld"] = "EscrowFundsHeld"
    data: EscrowFundsHeldData


class PaymentFailed(EventBase):
    """A payment attempt failed."""

    type: Literal["PaymentFailed"] = "PaymentFailed"
    data: PaymentFailedData


class EscrowCancelled(EventBase):
    """The escrow was cancelled before funding."""

    type: Literal["EscrowCancelled"] = "EscrowCancelled"
    data: EscrowCancelledData


class EscrowDelivered(EventBase):
    """The seller delivered."""

    type: Literal["EscrowDelivered"] = "EscrowDelivered"
    data: EscrowDeliveredData


class EscrowDisputed(EventBase):
    """A party raised a dispute."""

    type: Literal["EscrowDisputed"] = "EscrowDisputed"
    data: EscrowDisputedData


class SettlementRequested(EventBase):
    """A release or refund was requested from the provider."""

    type: Literal["SettlementRequested"] = "SettlementRequested"
    data: SettlementRequestedData


class SettlementFailed(EventBase):
    """The provider failed the settlement; it was cleared."""

    type: Literal["SettlementFailed"] = "SettlementFailed"
    data: SettlementFailedData


class EscrowReleased(EventBase):
    """The funds were paid to the seller."""

    type: Literal["EscrowReleased"] = "EscrowReleased"
    data: EscrowReleasedData


class EscrowRefunded(EventBase):
    """The funds were paid back to the buyer."""

    type: Literal["EscrowRefunded"] = "EscrowRefunded"
    data: EscrowRefundedData


class MilestoneDelivered(EventBase):
    """The seller delivered a milestone."""

    type: Literal["MilestoneDelivered"] = "MilestoneDelivered"
    data: MilestoneDeliveredData


class MilestoneReleased(EventBase):
    """A milestone's amount was paid to the seller."""

    type: Literal["MilestoneReleased"] = "MilestoneReleased"
    data: MilestoneReleasedData


class ChargebackOpened(EventBase):
    """A card chargeback was opened on the escrow's payment."""

    type: Literal["ChargebackOpened"] = "ChargebackOpened"
    data: ChargebackOpenedData


class ChargebackClosed(EventBase):
    """A card chargeback was closed (won, or lost after the funds had left)."""

    type: Literal["ChargebackClosed"] = "ChargebackClosed"
    data: ChargebackClosedData


Event = (
    EscrowCreated
    | PaymentInstructionsRecorded
    | EscrowFundsHeld
    | PaymentFailed
    | EscrowCancelled
    | EscrowDelivered
    | EscrowDisputed
    | SettlementRequested
    | SettlementFailed
    | EscrowReleased
    | EscrowRefunded
    | MilestoneDelivered
    | MilestoneReleased
    | ChargebackOpened
    | ChargebackClosed
)

EVENT_CLASSES: tuple[type[EventBase], ...] = (
    EscrowCreated,
    PaymentInstructionsRecorded,
    EscrowFundsHeld,
    PaymentFailed,
    EscrowCancelled,
    EscrowDelivered,
    EscrowDisputed,
    SettlementRequested,
    SettlementFailed,
    EscrowReleased,
    EscrowRefunded,
    MilestoneDelivered,
    MilestoneReleased,
    ChargebackOpened,
    ChargebackClosed,
)
EVENT_TYPES: dict[str, type[EventBase]] = {
    cls.model_fields["type"].default: cls for cls in EVENT_CLASSES
}
#: Event class by the class of its data.
EVENT_FOR_DATA: dict[type[EventData], type[EventBase]] = {
    cls.model_fields["data"].annotation: cls  # type: ignore[misc]
    for cls in EVENT_CLASSES
}
DATA_FOR_TYPE: dict[str, type[EventData]] = {
    name: cls.model_fields["data"].annotation  # type: ignore[misc]
    for name, cls in EVENT_TYPES.items()
}

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(
    Annotated[Event, Field(discriminator="type")]  # type: ignore[arg-type,maybe-unrecognized-str-typeform,unused-ignore]
)


class EventInvalid(ValueError):
    """An event message that is malformed; `errors` lists `{field, message}` per problem."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        detail = "; ".join(f"{e['field'] or '<root>'}: {e['message']}" for e in errors)
        super().__init__(f"invalid event: {detail}")


def parse_event(data: Mapping[str, Any] | Any) -> Event:
    """Validate one event as read from `escrow.events.v1` JSON; raise EventInvalid if not."""
    if not isinstance(data, Mapping):
        raise EventInvalid([{"field": "", "message": "an event must be a JSON object"}])
    event_type = data.get("type")
    cls = EVENT_TYPES.get(event_type) if isinstance(event_type, str) else None
    if cls is None:
        raise EventInvalid([{"field": "type", "message": f"unknown event type {event_type!r}"}])
    try:
        event = cls.model_validate(data, context=WIRE_CONTEXT)
    except ValidationError as exc:
        raise EventInvalid(validation_errors(exc)) from None
    return event  # type: ignore[return-value]
