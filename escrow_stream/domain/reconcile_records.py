"""The records the provider reconciliation compares (:mod:`escrow_stream.domain.reconcile`):
provider objects, our records of each kind, and the differences found."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

#: Provider objects are listed from this long before ``since`` (clock skew between us and
#: the provider; an object made just before the record of ours that names it).
LISTING_MARGIN = timedelta(days=1)
#: The providerReference of a settlement that moved no money (agents.effect_rules answers it).
NO_TRANSFER = "no-transfer"
#: A custodian transfer returning unmatched USDC has the reference ``unmatched:{fundsId}``.
UNMATCHED_PREFIX = "unmatched:"


class Kind(StrEnum):
    MISSING_ON_OUR_SIDE = "missing_on_our_side"
    MISSING_AT_PROVIDER = "missing_at_provider"
    AMOUNT_DIFFERS = "amount_differs"
    STATUS_DIFFERS = "status_differs"


class Obj(StrEnum):
    """The provider object kinds compared."""

    PAYMENT_INTENT = "payment_intent"
    TRANSFER = "transfer"
    REFUND = "refund"
    DEPOSIT = "deposit"


STRIPE = "stripe"
CUSTODIAN = "custodian"


@dataclass(frozen=True)
class ProviderObject:
    """One object as the provider lists it (amounts in minor units)."""

    provider: str  # stripe | custodian
    object: Obj
    object_id: str
    amount: int
    currency: str
    status: str
    created: datetime
    escrow_id: str | None = None  # from our metadata
    settlement_id: str | None = None  # Stripe metadata.settlement_id; custodian reference
    unmatched_funds_id: str | None = None
    payment_intent: str | None = None  # a Refund's PaymentIntent
    confirmations: int | None = None  # a custodian deposit's


@dataclass(frozen=True)
class FundedEscrow:
    """An escrow of this deployment and the provider payment that funded it (if any)."""

    escrow_id: str
    provider: str
    created_at: datetime
    instructions_id: str | None  # the PaymentIntent / deposit address we were given
    funded_payment_id: str | None  # the PaymentIntent / custodian deposit that funded it
    funded_amount: int


@dataclass(frozen=True)
class SettlementEffect:
    """A settlement effect of ``payment_effects`` (key = the settlement id)."""

    key: str
    escrow_id: str
    provider: str
    kind: str  # RELEASE | REFUND
    state: str  # STARTED | SUCCEEDED | FAILED
    object_id: str | None
    amount: int  # the payout amount: what the transfer / refund moves
    created_at: datetime


@dataclass(frozen=True)
class LedgerSettlement:
    """A settlement the ledger records (EscrowReleased, MilestoneReleased, EscrowRefunded)."""

    event_id: str
    escrow_id: str
    event_type: str
    provider: str
    reference: str  # the provider's object id
    amount: int  # what moved: payoutAmount of a release, amount of a refund
    occurred_at: datetime


@dataclass(frozen=True)
class OurDeposit:
    deposit_id: str
    escrow_id: str
    amount: int
    status: str
    received_at: datetime


@dataclass(frozen=True)
class UnmatchedFunds:
    funds_id: str
    provider: str
    object_id: str  # the PaymentIntent / custodian deposit
    escrow_id: str | None
    amount: int
    status: str
    return_reference: str | None  # the Stripe Refund / custodian transfer that returned it
    created_at: datetime


@dataclass(frozen=True)
class OurRecords:
    escrows: tuple[FundedEscrow, ...] = ()
    settlements: tuple[SettlementEffect, ...] = ()
    ledger: tuple[LedgerSettlement, ...] = ()
    deposits: tuple[OurDeposit, ...] = ()
    unmatched: tuple[UnmatchedFunds, ...] = ()
    #: escrow ids / funds ids the database holds for other deployments (skipped)
    foreign_escrows: frozenset[str] = frozenset()
    foreign_funds: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Difference:
    kind: Kind
    provider: str
    object: Obj
    object_id: str | None
    escrow_id: str | None
    ours: dict[str, Any] | None
    theirs: dict[str, Any] | None
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "provider": self.provider,
            "object": self.object.value,
            "objectId": self.object_id,
            "escrowId": self.escrow_id,
            "ours": self.ours,
            "theirs": self.theirs,
            "detail": self.detail,
        }


def their_side(o: ProviderObject) -> dict[str, Any]:
    """What a :class:`Difference` shows of the provider's object."""
    return {"amount": o.amount, "currency": o.currency, "status": o.status}
