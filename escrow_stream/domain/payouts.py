"""Where a settlement pays: the seller's payout account for a release, the buyer for a refund."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from ._model import DomainModel, Id
from .money import Rail


class SettlementStatus(StrEnum):
    """Whether the payments agent may act on a settlement yet."""

    #: The destination is known: the payments agent performs it.
    PENDING = "PENDING"
    #: A release whose seller has no ACTIVE payout account for the rail: nobody acts until
    #: the account is activated and ResumeSettlement records the destination.
    AWAITING_PAYOUT_ACCOUNT = "AWAITING_PAYOUT_ACCOUNT"


class StripeAccountDestination(DomainModel):
    """A Stripe Connect account: a release is a Transfer to it."""

    type: Literal["stripe_account"] = "stripe_account"
    account_id: Id


class WalletDestination(DomainModel):
    """A 0x address on Base: the custodian transfers USDC to it."""

    type: Literal["wallet"] = "wallet"
    address: Id


class BuyerDestination(DomainModel):
    """Back to the buyer's card: a Stripe refund of the PaymentIntent."""

    type: Literal["buyer"] = "buyer"


#: What a settlement records as its destination when it is requested.
PayoutDestination = Annotated[
    StripeAccountDestination | WalletDestination | BuyerDestination,
    Field(discriminator="type"),
]

#: The destination type a seller's payout account must have on each rail.
RAIL_PAYOUT_TYPE: dict[Rail, str] = {Rail.STRIPE: "stripe_account", Rail.USDC_BASE: "wallet"}


def fits_rail(
    destination: StripeAccountDestination | WalletDestination | BuyerDestination | None,
    rail: Rail,
) -> bool:
    """True when ``destination`` is a seller payout account usable on ``rail``."""
    return destination is not None and destination.type == RAIL_PAYOUT_TYPE[rail]
