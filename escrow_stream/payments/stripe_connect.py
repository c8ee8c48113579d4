"""Stripe Connect onboarding of sellers: Express accounts and Account Links (``stripe`` SDK).

* ``POST /v1/accounts`` ``type=express``, ``capabilities[transfers][requested]=true``,
  ``metadata[user_id]``, with the idempotency key ``payout-account:{userId}``: one account
  per seller however often onboarding is started (within Stripe's idempotency window; after
  it, the ``payout_accounts`` row already names the account and no new one is asked for).
* ``POST /v1/account_links`` ``type=account_onboarding`` with ``return_url`` and
  ``refresh_url`` under ``WEB_APP_URL``: a fresh, short-lived onboarding URL each time.
* ``GET /v1/accounts/{id}``: ``payouts_enabled`` decides whether an account a marketplace
  onboarded elsewhere is ACTIVE.

Express onboarding through Account Links needs no OAuth, so ``STRIPE_CONNECT_CLIENT_ID``
(Standard accounts' OAuth flow) is not used here.
"""

from __future__ import annotations

from urllib.parse import quote

import stripe

from escrow_stream.config import Settings
from escrow_stream.payments.stripe_rail import stripe_client


class StripeUnavailable(Exception):
    """Stripe gave no usable answer; the caller answers 503 and the seller tries again."""


class AccountNotFound(Exception):
    """The provider has no such account (an admin named a Connect account that is not ours)."""


def account_key(user_id: str) -> str:
    return f"payout-account:{user_id}"


class StripeConnect:
    def __init__(self, settings: Settings) -> None:
        self._client = stripe_client(settings)
        self._app_url = settings.web_app_url.rstrip("/")

    async def create_express_account(self, user_id: str) -> str:
        """The seller's Express account id (the same one for the same user)."""
        try:
            account = await self._client.v1.accounts.create_async(
                params={
                    "type": "express",
                    "capabilities": {"transfers": {"requested": True}},
                    "metadata": {"user_id": user_id},
                },
                options={"idempotency_key": account_key(user_id)},
            )
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"creating the Connect account: {exc}") from None
        return str(account.id)

    async def onboarding_url(self, account_id: str) -> str:
        """A fresh Account Link into Stripe's hosted onboarding for ``account_id``."""
        back = f"{self._app_url}/payouts/stripe"
        try:
            link = await self._client.v1.account_links.create_async(
                params={
                    "account": account_id,
                    "type": "account_onboarding",
                    "return_url": f"{back}/return?account={quote(account_id)}",
                    "refresh_url": f"{back}/refresh?account={quote(account_id)}",
                }
            )
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"creating the account link: {exc}") from None
        return str(link.url)

    async def payouts_enabled(self, account_id: str) -> bool | None:
        """Whether Stripe pays out to ``account_id``; None when Stripe has no such account."""
        try:
            account = await self._client.v1.accounts.retrieve_async(account_id)
        except stripe.InvalidRequestError:
            return None
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"retrieving the Connect account: {exc}") from None
        return bool(account.payouts_enabled)
