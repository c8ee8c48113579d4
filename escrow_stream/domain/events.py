"""Events (past tense): one small frozen model per type, each with the snapshot after it."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from ._model import (
    WIRE_CONTEXT,
    Id,
    Timestamp,
    TolerantModel,
)
from .commands import validation_errors
from .escrow import Actor, Escrow
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

#: Fixed namespace of event ids: eventId = uuid5(EVENT_ID_NAMESPACE, f"{escrowId}:{version}").
EVENT_ID_NAMESPACE = uuid.UUID("6f1c2a9e-4d3b-5e7f-8a90-1b2c3d4e5f60")


_NAMESPACE_SHA1 = hashlib.sha1(EVENT_ID_NAMESPACE.bytes, usedforsecurity=False)


def event_id_for(escrow_id: str, version: int) -> str:
    """The deterministic id of the event that gives `escrow_id` its `version`:
    ``str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{escrowId}:{version}"))``, computed the way
    ``uuid.uuid5`` does (SHA-1 of namespace and name, first 16 bytes, version 5 and the
    RFC 4122 variant) without building a UUID object."""
    digest = _NAMESPACE_SHA1.copy()
    digest.update(f"{escrow_id}:{version}".encode())
    raw = bytearray(digest.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # variant RFC 4122
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
