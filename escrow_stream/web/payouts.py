"""Payout accounts over HTTP (SPEC §10): where a seller is paid, set by the seller or a service.

* ``POST /api/payout-accounts/stripe`` (a user, for themselves): the seller's Stripe Connect
  Express account (created once) and a fresh onboarding link; 201.  Stripe's signed
  ``account.updated`` with ``payouts_enabled`` makes it ACTIVE (``web/webhooks.py``).
* ``PUT /api/payout-accounts/usdc`` (a user) ``{"walletAddress": "0x…"}`` (``address`` is
  accepted too): syntax and EIP-55 checksum (422), then TRM Labs + Chainalysis: 200 ACTIVE
  when clean, 200 REJECTED when flagged (never paid), 202 PENDING when a provider had no
  answer: fail closed, screened again in the background until it has one.
* ``PUT /api/payout-accounts/{userId}`` (service, admin) ``{"rail": "STRIPE", "accountId"}``
  or ``{"rail": "USDC_BASE", "walletAddress"}``, optional ``"status": "REJECTED"`` to block:
  for sellers onboarded elsewhere.  A Connect account is retrieved from Stripe and ACTIVE
  only if its payouts are enabled; a wallet is screened as above.  Nobody can declare an
  account ACTIVE without the provider saying so.
* ``GET /api/payout-accounts/me`` (a user) and ``GET /api/payout-accounts/{userId}``
  (service, admin, or the user): ``{"userId", "accounts": [...]}``.

Each request: authenticate (401), the role (403), then the body (400, 415, 422), then the
provider (503 ``PROVIDER_UNAVAILABLE`` when Stripe cannot be reached).  Activating an
account resumes the seller's releases that waited for it (``agents/payouts.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import faust
from faust.web import Request, Response, View
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from escrow_stream.clock import Clock
from escrow_stream.db.payouts import PayoutAccount, PayoutStatus
from escrow_stream.domain import Rail
from escrow_stream.payments.addresses import address_problem
from escrow_stream.payments.stripe_connect import AccountNotFound, StripeUnavailable
from escrow_stream.web.auth import Principal, Role
from escrow_stream.web.gateway import Gateway, json_response
from escrow_stream.web.problems import Problem
from escrow_stream.web.schemas import EmptyBody

STRIPE_ACCOUNT_PATTERN = r"^acct_[A-Za-z0-9]{1,200}$"
WALLET_ALIASES = AliasChoices("walletAddress", "address")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class WalletBody(_In):
    """``PUT /api/payout-accounts/usdc``: the seller's own USDC wallet on Base."""

    wallet_address: str = Field(
        validation_alias=WALLET_ALIASES,
        serialization_alias="walletAddress",
        description="0x + 40 hex digits; EIP-55 checksummed when in mixed case",
    )

    @model_validator(mode="after")
    def _check_address(self) -> WalletBody:
        problem = address_problem(self.wallet_address)
        if problem is not None:
            raise ValueError(f"walletAddress {problem}")
        return self


class PayoutAccountBody(_In):
    """``PUT /api/payout-accounts/{userId}`` (service, admin)."""

    rail: Rail
    account_id: str | None = Field(
        None, alias="accountId", pattern=STRIPE_ACCOUNT_PATTERN, description="rail STRIPE"
    )
    wallet_address: str | None = Field(
        None,
        validation_alias=WALLET_ALIASES,
        serialization_alias="walletAddress",
        description="rail USDC_BASE",
    )
    status: Literal["REJECTED"] | None = Field(
        None, description="REJECTED blocks the account; otherwise the provider decides"
    )

    @model_validator(mode="after")
    def _check_destination(self) -> PayoutAccountBody:
        if self.rail is Rail.STRIPE:
            if self.account_id is None or self.wallet_address is not None:
                raise ValueError("rail STRIPE takes accountId (and no walletAddress)")
        else:
            if self.wallet_address is None or self.account_id is not None:
                raise ValueError("rail USDC_BASE takes walletAddress (and no accountId)")
            problem = address_problem(self.wallet_address)
            if problem is not None:
                raise ValueError(f"walletAddress {problem}")
        return self

    @property
    def destination(self) -> str:
        value = self.account_id if self.rail is Rail.STRIPE else self.wallet_address
        assert value is not None
        return value


class PayoutAccountOut(BaseModel):
    """One payout account as the API shows it."""

    model_config = ConfigDict(populate_by_name=True)

    user_id: str = Field(alias="userId")
    rail: Rail
    account_id: str | None = Field(None, alias="accountId")
    wallet_address: str | None = Field(None, alias="walletAddress")
    status: PayoutStatus
    screening: dict[str, Any] | None = None
    last_error: str | None = Field(None, alias="lastError")
    onboarding_url: str | None = Field(None, alias="onboardingUrl")
    created_at: datetime = Field(alias="createdAt")
    updated_at: datetime = Field(alias="updatedAt")


class PayoutAccountList(BaseModel):
    """A user's payout accounts, one per rail at most."""

    model_config = ConfigDict(populate_by_name=True)

    user_id: str = Field(alias="userId")
    accounts: list[PayoutAccountOut]


class PayoutAccounts(Protocol):
    """What the views ask of the payout-account service (``agents/payouts.PayoutService``)."""

    async def accounts(self, user_id: str) -> list[PayoutAccount]: ...

    async def onboard_stripe(self, user_id: str) -> tuple[PayoutAccount, str]: ...

    async def set_stripe(self, user_id: str, account_id: str, updated_by: str) -> PayoutAccount: ...

    async def set_wallet(self, user_id: str, address: str, updated_by: str) -> PayoutAccount: ...

    async def reject(
        self, user_id: str, rail: Rail, destination: str, updated_by: str
    ) -> PayoutAccount: ...

    async def stripe_account_updated(
        self, account_id: str, payouts_enabled: bool, event_at: datetime
    ) -> list[PayoutAccount]: ...


def _listing(user_id: str, accounts: list[PayoutAccount]) -> dict[str, Any]:
    return {"userId": user_id, "accounts": [a.as_json() for a in accounts]}


def _answer(view: View, account: PayoutAccount) -> Response:
    """200 with the account, 202 when its wallet screening is still due."""
    pending_wallet = account.rail is Rail.USDC_BASE and account.status is PayoutStatus.PENDING
    return json_response(view, account.as_json(), 202 if pending_wallet else 200)


def _unavailable(exc: Exception) -> Problem:
    return Problem(503, "PROVIDER_UNAVAILABLE", str(exc), headers={"Retry-After": "5"})


def account_updated_handler(
    service: PayoutAccounts, clock: Clock
) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    """What the Stripe webhook does with ``account.updated`` (wired in ``app.py``): the
    seller's payout account ACTIVE with ``payouts_enabled``, else back to PENDING."""

    async def account_updated(event: dict[str, Any]) -> dict[str, Any]:
        account = (event.get("data") or {}).get("object") or {}
        account_id = account.get("id")
        if not isinstance(account_id, str) or not account_id.startswith("acct_"):
            raise Problem(400, "INVALID_EVENT", "account.updated without an account id")
        created = event.get("created")
        at = datetime.fromtimestamp(created, UTC) if isinstance(created, int) else clock()
        enabled = account.get("payouts_enabled") is True
        changed = await service.stripe_account_updated(account_id, enabled, at)
        return {"received": True, "accounts": [a.as_json()["status"] for a in changed]}

    return account_updated


async def _set_account(
    service: PayoutAccounts, user_id: str, body: PayoutAccountBody, by: str
) -> PayoutAccount:
    """``PUT /api/payout-accounts/{userId}``: block the account, or set it on its rail (a
    Connect account Stripe does not know is 422, Stripe not answering 503)."""
    if body.status == "REJECTED":
        return await service.reject(user_id, body.rail, body.destination, by)
    if body.rail is not Rail.STRIPE:
        return await service.set_wallet(user_id, body.destination, by)
    try:
        return await service.set_stripe(user_id, body.destination, by)
    except StripeUnavailable as exc:
        raise _unavailable(exc) from None
    except AccountNotFound as exc:
        raise Problem(
            422,
            "VALIDATION_FAILED",
            str(exc),
            errors=[{"field": "accountId", "message": "no such Stripe account"}],
        ) from None


def register(app: faust.App, gateway: Gateway, service: PayoutAccounts) -> None:
    """Register the payout-account views."""

    async def user_only(request: Request) -> Principal:
        principal = await gateway.principal(request)
        if principal.role is not Role.USER:
            raise Problem(403, "NOT_AUTHORIZED", "a payout account belongs to a user (the seller)")
        return principal

    async def service_or_admin(request: Request, user_id: str, write: bool) -> Principal:
        principal = await gateway.principal(request)
        if principal.role in (Role.ADMIN, Role.SERVICE):
            return principal
        if not write and principal.sub == user_id:
            return principal
        raise Problem(403, "NOT_AUTHORIZED", "services and admins manage others' payout accounts")

    # static paths first: they must win over /{user_id}
    @app.page("/api/payout-accounts/stripe")
    class StripeOnboarding(View):
        async def post(self, request: Request) -> Response:
            principal = await user_only(request)
            await gateway.body(request, EmptyBody)
            try:
                account, url = await service.onboard_stripe(principal.sub)
            except StripeUnavailable as exc:
                raise _unavailable(exc) from None
            return json_response(self, {**account.as_json(), "onboardingUrl": url}, 201)

    @app.page("/api/payout-accounts/usdc")
    class OwnWallet(View):
        async def put(self, request: Request) -> Response:
            principal = await user_only(request)
            body, _ = await gateway.body(request, WalletBody)
            assert isinstance(body, WalletBody)
            account = await service.set_wallet(principal.sub, body.wallet_address, principal.sub)
            return _answer(self, account)

    @app.page("/api/payout-accounts/me")
    class OwnAccounts(View):
        async def get(self, request: Request) -> Response:
            principal = await user_only(request)
            accounts = await service.accounts(principal.sub)
            return json_response(self, _listing(principal.sub, accounts))

    @app.page("/api/payout-accounts/{user_id}")
    class UserAccounts(View):
        async def get(self, request: Request, user_id: str) -> Response:
            await service_or_admin(request, user_id, write=False)
            return json_response(self, _listing(user_id, await service.accounts(user_id)))

        async def put(self, request: Request, user_id: str) -> Response:
            principal = await service_or_admin(request, user_id, write=True)
            body, _ = await gateway.body(request, PayoutAccountBody)
            assert isinstance(body, PayoutAccountBody)
            by = f"{principal.role.value}:{principal.sub}"
            return _answer(self, await _set_account(service, user_id, body, by))
