"""Money: integer minor units carried as digit strings in JSON, rails and their currencies."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer, ValidationInfo, WithJsonSchema

MINOR_DIGITS_MAX = 30
_UNSIGNED = re.compile(rf"^[0-9]{{1,{MINOR_DIGITS_MAX}}}$")
_SIGNED = re.compile(rf"^-?[0-9]{{1,{MINOR_DIGITS_MAX}}}$")


class Rail(StrEnum):
    """How the buyer pays: card through Stripe, or USDC on Base through the custodian."""

    STRIPE = "STRIPE"
    USDC_BASE = "USDC_BASE"


class Currency(StrEnum):
    """Currencies; amounts are in their minor units (USD cents, USDC base units)."""

    USD = "USD"
    USDC = "USDC"


class Provider(StrEnum):
    """The payment provider that moves money for a rail."""

    STRIPE = "stripe"
    CUSTODIAN = "custodian"


#: Stripe's largest single charge: 99,999,999 minor units (USD 999,999.99).
STRIPE_CHARGE_MAX_MINOR = 99_999_999
BPS_PER_UNIT = 10_000

RAIL_CURRENCY: dict[Rail, Currency] = {Rail.STRIPE: Currency.USD, Rail.USDC_BASE: Currency.USDC}
RAIL_PROVIDER: dict[Rail, Provider] = {
    Rail.STRIPE: Provider.STRIPE,
    Rail.USDC_BASE: Provider.CUSTODIAN,
}


def _minor_validator(pattern: re.Pattern[str], what: str) -> Any:
    def parse(value: object, info: ValidationInfo) -> int:
        if isinstance(value, str):
            if pattern.match(value) is None:
                raise ValueError(f"must be a string of {what} (minor units)")
            return int(value)
        wire = bool(info.context and info.context.get("wire"))
        if isinstance(value, int) and not isinstance(value, bool) and not wire:
            if len(str(abs(value))) > MINOR_DIGITS_MAX:
                raise ValueError("amount has too many digits")
            return value
        raise ValueError(f"must be a string of {what} (minor units)")

    return parse


def _to_str(value: int) -> str:
    return str(value)


#: A non-negative amount in minor units: int in Python, digit string in JSON.
MinorUnits = Annotated[
    int,
    BeforeValidator(_minor_validator(_UNSIGNED, "decimal digits")),
    PlainSerializer(_to_str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": f"^[0-9]{{1,{MINOR_DIGITS_MAX}}}$"}),
]
#: A strictly positive amount in minor units.
PositiveMinorUnits = Annotated[MinorUnits, Field(gt=0)]
#: A signed amount in minor units (ledger lines).
SignedMinorUnits = Annotated[
    int,
    BeforeValidator(_minor_validator(_SIGNED, "decimal digits, optionally signed")),
    PlainSerializer(_to_str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": f"^-?[0-9]{{1,{MINOR_DIGITS_MAX}}}$"}),
]


def release_fee(seller_fee: int, total: int, released_before: int, amount: int) -> int:
    """Platform fee withheld from releasing `amount` after `released_before` was released.

    The fee is spread proportionally with cumulative flooring, so releasing the whole
    amount (at once or milestone by milestone) withholds exactly `seller_fee`.
    """
    if total <= 0:
        return 0
    after = released_before + amount
    return (seller_fee * after) // total - (seller_fee * released_before) // total


def policy_fee(amount: int, fee_bps: int) -> int:
    """The platform fee set by policy: ``fee_bps`` basis points of ``amount``, rounded down
    to the minor unit."""
    return amount * fee_bps // BPS_PER_UNIT
