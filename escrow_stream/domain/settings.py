"""Settings and looked-up facts the pure decision function is given by its caller."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .money import Currency
from .payouts import PayoutDestination

#: Default maximum amount per currency: USD 100,000,000.00 and USDC 100,000,000.000000.
DEFAULT_MAX_AMOUNT_MINOR: dict[Currency, int] = {
    Currency.USD: 100_000_000_00,
    Currency.USDC: 100_000_000_000_000,
}


class DomainSettings(BaseModel):
    """Business settings of the domain (the app fills them from the environment)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    payment_deadline_days: int = Field(default=7, ge=1, le=3650)
    auto_refund_deadline_days: int = Field(default=7, ge=1, le=3650)
    delivered_timeout_action: Literal["refund", "release"] = "refund"
    feature_milestone_escrows: bool = True
    feature_auto_refund: bool = True
    feature_kyc_gating: bool = False
    #: Largest amount accepted on create: one int for every currency, or one per currency.
    max_amount_minor: int | dict[Currency, int] = Field(
        default_factory=lambda: dict(DEFAULT_MAX_AMOUNT_MINOR)
    )
    #: Platform fee withheld from the seller when a create names no sellerFee, in basis
    #: points of the amount (rounded down to the minor unit).
    fee_bps: int = Field(default=0, ge=0, le=10_000)
    #: How many commandIds an escrow remembers for duplicate detection (FIFO eviction).
    recent_commands_max: int = Field(default=1000, ge=1, le=100_000)

    def max_amount_for(self, currency: Currency) -> int:
        """The largest amount accepted in `currency`."""
        if isinstance(self.max_amount_minor, int):
            return self.max_amount_minor
        return self.max_amount_minor.get(currency, DEFAULT_MAX_AMOUNT_MINOR[currency])


class DecisionContext(BaseModel):
    """Facts the caller looked up before deciding (e.g. KYC status of the parties)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kyc_verified_user_ids: frozenset[str] = frozenset()
    #: The seller's ACTIVE payout account for the escrow's rail, looked up for a release
    #: (None: no such account, or not looked up: the release then awaits one).
    seller_payout: PayoutDestination | None = None
