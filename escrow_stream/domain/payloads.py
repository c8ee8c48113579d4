"""What each command carries: one frozen payload model per command type, with its own
validation (amounts, milestones, cross-field rules), and the reasons and outcomes they name.

``commands`` wraps each payload in its envelope and parses the wire form.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from ._model import (
    MILESTONES_MAX,
    DomainModel,
    EvidenceKeys,
    Id,
    ShortText,
    Text,
)
from .escrow import SettlementKind
from .money import RAIL_CURRENCY, Currency, MinorUnits, PositiveMinorUnits, Provider, Rail


class CancelReason(StrEnum):
    """Why an escrow awaiting funds is cancelled."""

    BUYER_CANCELLED = "BUYER_CANCELLED"
    SELLER_CANCELLED = "SELLER_CANCELLED"
    ADMIN = "ADMIN"
    TIMEOUT = "TIMEOUT"
    COMPLIANCE_REJECTED = "COMPLIANCE_REJECTED"


#: The reason a system timeout carries (CancelEscrow, RefundEscrow, ReleaseFunds).
TIMEOUT_REASON = "TIMEOUT"


def _cross_field(field: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("cross_field", "{message}", {"message": message, "field": field})


# --- payloads -------------------------------------------------------------------------


class MilestoneSpec(DomainModel):
    """A milestone as requested on creation."""

    milestone_id: Id
    title: ShortText
    amount: PositiveMinorUnits


class CreateEscrowPayload(DomainModel):
    """Payload of CreateEscrow."""

    offer_id: Id
    contract_id: Id
    buyer_id: Id
    seller_id: Id
    rail: Rail
    amount: PositiveMinorUnits
    currency: Currency
    #: Withheld from the seller's payout; None: the policy fee (``DomainSettings.fee_bps``).
    seller_fee: MinorUnits | None = None
    seller_account_id: Id | None = None
    buyer_wallet_address: Id | None = None
    milestones: Annotated[tuple[MilestoneSpec, ...], Field(max_length=MILESTONES_MAX)] = ()

    @model_validator(mode="after")
    def _check_parties(self) -> CreateEscrowPayload:
        if self.seller_id == self.buyer_id:
            raise _cross_field("sellerId", "sellerId must differ from buyerId")
        return self

    @model_validator(mode="after")
    def _check_currency(self) -> CreateEscrowPayload:
        expected = RAIL_CURRENCY[self.rail]
        if self.currency != expected:
            raise _cross_field(
                "currency", f"rail {self.rail.value} requires currency {expected.value}"
            )
        return self

    @model_validator(mode="after")
    def _check_fee(self) -> CreateEscrowPayload:
        if self.seller_fee is not None and self.seller_fee > self.amount:
            raise _cross_field("sellerFee", "sellerFee must be within [0, amount]")
        return self

    @model_validator(mode="after")
    def _check_milestones(self) -> CreateEscrowPayload:
        if not self.milestones:
            return self
        ids = [m.milestone_id for m in self.milestones]
        if len(set(ids)) != len(ids):
            raise _cross_field("milestones", "milestoneId values must be unique")
        total = sum(m.amount for m in self.milestones)
        if total != self.amount:
            raise _cross_field(
                "milestones", f"milestone amounts sum to {total}, expected amount {self.amount}"
            )
        return self


class RecordPaymentInstructionsPayload(DomainModel):
    """Payload of RecordPaymentInstructions."""

    provider: Provider
    provider_payment_id: Id
    deposit_address: Id | None = None


class ConfirmFundsPayload(DomainModel):
    """Payload of ConfirmFunds."""

    provider: Provider
    provider_payment_id: Id
    amount: PositiveMinorUnits
    currency: Currency
    sender_address: Id | None = None


class RecordPaymentFailurePayload(DomainModel):
    """Payload of RecordPaymentFailure (no providerPaymentId when the provider refused to
    create the payment at all)."""

    provider: Provider
    provider_payment_id: Id | None = None
    error_code: ShortText
    error_message: Text


class CancelEscrowPayload(DomainModel):
    """Payload of CancelEscrow.  A COMPLIANCE_REJECTED cancellation names the flagged deposit
    (``providerPaymentId``, ``amount``, ``currency``): it cancels the escrow only when that
    deposit is the one that would fund it (exactly its amount and currency, SPEC §10)."""

    reason: CancelReason
    provider_payment_id: Id | None = None
    amount: PositiveMinorUnits | None = None
    currency: Currency | None = None


class MarkDeliveredPayload(DomainModel):
    """Payload of MarkDelivered."""

    note: Text | None = None
    evidence_keys: EvidenceKeys = ()


class ReleaseFundsPayload(DomainModel):
    """Payload of ReleaseFunds (empty; `reason` TIMEOUT only for the system's auto-release)."""

    reason: ShortText | None = None


class RaiseDisputePayload(DomainModel):
    """Payload of RaiseDispute."""

    reason: ShortText
    evidence_keys: EvidenceKeys = ()


class ResolveDisputePayload(DomainModel):
    """Payload of ResolveDispute."""

    resolution: SettlementKind
    reason: ShortText


class RefundEscrowPayload(DomainModel):
    """Payload of RefundEscrow."""

    reason: ShortText


class ConfirmSettlementPayload(DomainModel):
    """Payload of ConfirmSettlement: which settlement, and what the provider actually moved."""

    settlement_id: Id
    provider: Provider
    provider_reference: Id
    amount: MinorUnits


class RecordSettlementFailurePayload(DomainModel):
    """Payload of RecordSettlementFailure: which settlement failed, and why."""

    settlement_id: Id
    error_code: ShortText
    error_message: Text
    retryable: bool


class MilestonePayload(DomainModel):
    """Payload of DeliverMilestone and ReleaseMilestone."""

    milestone_id: Id


class ChargebackOutcome(StrEnum):
    """How the card network closed a chargeback."""

    WON = "WON"
    LOST = "LOST"


#: The reason an escrow ended REFUNDED by a lost chargeback (EscrowRefunded ``reason``).
CHARGEBACK_REASON = "CHARGEBACK"


class OpenChargebackPayload(DomainModel):
    """Payload of OpenChargeback: a Stripe dispute on the escrow's payment."""

    provider: Provider
    dispute_id: Id
    charge_id: Id | None = None
    payment_intent_id: Id | None = None
    amount: PositiveMinorUnits
    currency: Currency
    reason: ShortText


class CloseChargebackPayload(DomainModel):
    """Payload of CloseChargeback: the dispute's outcome (``amount``: as the network says)."""

    dispute_id: Id
    outcome: ChargebackOutcome
    amount: MinorUnits | None = None


class ResumeSettlementPayload(DomainModel):
    """Payload of ResumeSettlement: the awaiting settlement to resume."""

    settlement_id: Id
