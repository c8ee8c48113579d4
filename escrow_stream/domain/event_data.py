"""What each event records: one data model per event type (the facts the decision
established), tolerant of fields added later.

``events`` wraps each in its envelope with the snapshot after it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ._model import (
    MILESTONES_MAX,
    EvidenceKeys,
    Id,
    ShortText,
    Text,
    Timestamp,
    TolerantModel,
)
from .escrow import SettlementKind
from .money import Currency, MinorUnits, PositiveMinorUnits, Provider, Rail
from .payloads import CancelReason, ChargebackOutcome, MilestoneSpec
from .payouts import PayoutDestination, SettlementStatus


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
