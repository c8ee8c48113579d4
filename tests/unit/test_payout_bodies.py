"""Payout-account request bodies: what a seller or a service may send (422 otherwise)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from escrow_stream.domain import Rail
from escrow_stream.web.payouts import PayoutAccountBody, WalletBody

CHECKSUMMED = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


def test_a_wallet_body_takes_walletaddress_or_address() -> None:
    assert WalletBody.model_validate({"walletAddress": CHECKSUMMED}).wallet_address == CHECKSUMMED
    assert WalletBody.model_validate({"address": CHECKSUMMED.lower()}).wallet_address == (
        CHECKSUMMED.lower()
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"walletAddress": "0x123"},
        {"walletAddress": CHECKSUMMED[:-1] + "D"},  # a broken checksum
        {"walletAddress": CHECKSUMMED, "sellerId": "someone-else"},
    ],
)
def test_bad_wallet_bodies_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WalletBody.model_validate(body)


def test_a_service_names_the_destination_that_fits_the_rail() -> None:
    stripe = PayoutAccountBody.model_validate({"rail": "STRIPE", "accountId": "acct_1Ab"})
    assert (stripe.rail, stripe.destination, stripe.status) == (Rail.STRIPE, "acct_1Ab", None)
    usdc = PayoutAccountBody.model_validate(
        {"rail": "USDC_BASE", "walletAddress": CHECKSUMMED, "status": "REJECTED"}
    )
    assert (usdc.destination, usdc.status) == (CHECKSUMMED, "REJECTED")


@pytest.mark.parametrize(
    "body",
    [
        {"rail": "STRIPE"},
        {"rail": "STRIPE", "accountId": "not-an-account"},
        {"rail": "STRIPE", "accountId": "acct_1", "walletAddress": CHECKSUMMED},
        {"rail": "USDC_BASE", "accountId": "acct_1"},
        {"rail": "USDC_BASE", "walletAddress": "0x12"},
        {"rail": "USDC_BASE", "walletAddress": CHECKSUMMED, "status": "ACTIVE"},  # never by fiat
        {"rail": "PAYPAL", "accountId": "acct_1"},
    ],
)
def test_bad_service_bodies_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PayoutAccountBody.model_validate(body)
