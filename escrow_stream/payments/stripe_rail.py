"""The Stripe rail (USD), "separate charges and transfers" (SPEC §5), with the ``stripe`` SDK.

Every call carries an idempotency key derived from the escrow (never from time or
randomness), so a redelivered event asks Stripe for the same object again and gets it.
``STRIPE_API_BASE`` points the SDK at stripe-mock in development and tests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import stripe

from escrow_stream.config import Settings
from escrow_stream.domain import Escrow, SettlementKind, StripeAccountDestination
from escrow_stream.domain.escrow import Settlement
from escrow_stream.metrics import observe_provider_call
from escrow_stream.payments.common import PermanentSettlementError, pending_settlement


def payment_intent_key(escrow_id: str) -> str:
    return f"escrow-payment-intent:{escrow_id}"


def cancel_key(escrow_id: str) -> str:
    return f"escrow-payment-intent-cancel:{escrow_id}"


#: Refund statuses (Stripe): done, still on its way, or not happening.
REFUND_DONE = frozenset({"succeeded"})
REFUND_UNDER_WAY = frozenset({"pending", "requires_action"})


class MeteredHTTPXClient(stripe.HTTPXClient):
    """The SDK's httpx client, counting every request it sends (each retry too) in
    ``escrow_provider_requests_total{provider="stripe"}``; a network error is raised by the
    SDK as ``APIConnectionError``."""

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        started = time.perf_counter()
        try:
            content, status, answer_headers = await super().request_async(
                method, url, headers, post_data
            )
        except stripe.APIConnectionError:
            observe_provider_call("stripe", None, time.perf_counter() - started)
            raise
        observe_provider_call("stripe", status, time.perf_counter() - started)
        return content, status, answer_headers


def stripe_client(settings: Settings) -> stripe.StripeClient:
    """The SDK client every Stripe call goes through (``STRIPE_API_BASE``, timeouts, retries)."""
    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(
        settings.stripe_secret_key.get_secret_value(),
        base_addresses=base,  # type: ignore[arg-type]
        http_client=MeteredHTTPXClient(timeout=settings.provider_timeout_ms / 1000),
        max_network_retries=settings.escrow_max_retries,
    )


class StripeRail:
    def __init__(self, settings: Settings) -> None:
        self._client = stripe_client(settings)

    async def payment_instructions(self, escrow: Escrow) -> dict[str, Any]:
        """Create (or get again) the escrow's PaymentIntent: its id, and the client secret the
        buyer's front end needs (the agent keeps that out of the command: only the buyer may
        read it).  Raises :class:`PermanentSettlementError` when Stripe refuses for good."""
        escrow_id = escrow.escrow_id
        try:
            intent = await self._client.v1.payment_intents.create_async(
                params={
                    "amount": escrow.amount,
                    "currency": escrow.currency.value.lower(),
                    "metadata": {"escrow_id": escrow_id},
                    "transfer_group": escrow_id,
                },
                options={"idempotency_key": payment_intent_key(escrow_id)},
            )
        except stripe.StripeError as exc:
            raise_if_permanent(exc)
            raise
        return {
            "provider": "stripe",
            "providerPaymentId": intent.id,
            "clientSecret": intent.client_secret,
        }

    async def cancel_instructions(self, escrow: Escrow, payment_id: str) -> None:
        """Cancel the PaymentIntent of an escrow cancelled before it was funded, so the buyer
        can no longer pay it.  Stripe refuses (``payment_intent_unexpected_state``, raised as
        :class:`PermanentSettlementError`) when it already succeeded or is processing: that
        payment then reaches us as ``payment_intent.succeeded`` and is refunded as unmatched
        funds."""
        try:
            await self._client.v1.payment_intents.cancel_async(
                payment_id,
                params={"cancellation_reason": "abandoned"},
                options={"idempotency_key": cancel_key(escrow.escrow_id)},
            )
        except stripe.StripeError as exc:
            raise_if_permanent(exc)
            raise

    async def refund_payment(
        self, payment_intent_id: str, key: str, metadata: dict[str, str]
    ) -> tuple[str, str]:
        """Refund a PaymentIntent in full (money no escrow took); (Refund id, status).  The
        key makes a repeated call return the same Refund.  Raises
        :class:`PermanentSettlementError` when Stripe refuses for good."""
        try:
            refund = await self._client.v1.refunds.create_async(
                params={"payment_intent": payment_intent_id, "metadata": metadata},
                options={"idempotency_key": key},
            )
        except stripe.StripeError as exc:
            raise_if_permanent(exc)
            raise
        return refund.id, str(refund.status)

    async def refund_status(self, refund_id: str) -> str:
        """The current status of a Refund (a pending one is read again later)."""
        try:
            refund = await self._client.v1.refunds.retrieve_async(refund_id)
        except stripe.StripeError as exc:
            raise_if_permanent(exc)
            raise
        return str(refund.status)

    async def settle(self, escrow: Escrow) -> dict[str, Any]:
        """Perform the escrow's pending settlement; the ConfirmSettlement payload.

        RELEASE: a Transfer of the payout to the Connect account the settlement recorded as
        its ``destination`` (the seller's ACTIVE payout account when it was requested; never
        a value from the escrow's create body), funded by the charge
        (``source_transaction``) and grouped by the escrow.  REFUND: a Refund of the
        PaymentIntent.  Raises :class:`PermanentSettlementError` when Stripe refuses for
        good; other Stripe errors are for the caller to retry.
        """
        settlement = pending_settlement(escrow)
        escrow_id = escrow.escrow_id
        payment_intent_id = escrow.payment.provider_payment_id if escrow.payment else None
        amount = settlement.payout_amount
        key = settlement.settlement_id
        # the settlement id lets the transfer.created webhook confirm this very settlement
        # (``settlement_key``: the same value, the name transfers made before SPEC §10 carry)
        metadata = {
            "escrow_id": escrow_id,
            "attempt": str(settlement.attempt),
            "settlement_id": key,
            "settlement_key": key,
        }
        try:
            if settlement.kind is SettlementKind.RELEASE:
                params = {
                    "amount": amount,
                    "currency": escrow.currency.value.lower(),
                    "destination": _connect_account(settlement),
                    "transfer_group": escrow_id,
                    "metadata": metadata,
                }
                reference = await self._transfer(params, payment_intent_id, key)
            else:
                reference = await self._refund(payment_intent_id, amount, metadata, key)
        except stripe.StripeError as exc:
            raise_if_permanent(exc)
            raise
        return {"provider": "stripe", "providerReference": reference, "amount": str(amount)}

    async def _transfer(
        self, params: dict[str, Any], payment_intent_id: str | None, key: str
    ) -> str:
        """A release: the Transfer, funded by the PaymentIntent's charge when it has one."""
        if payment_intent_id:
            intent = await self._client.v1.payment_intents.retrieve_async(payment_intent_id)
            charge = intent.latest_charge
            if charge:
                params["source_transaction"] = charge if isinstance(charge, str) else charge.id
        transfer = await self._client.v1.transfers.create_async(
            params=params,  # type: ignore[arg-type]
            options={"idempotency_key": key},
        )
        return transfer.id

    async def _refund(
        self, payment_intent_id: str | None, amount: int, metadata: dict[str, str], key: str
    ) -> str:
        """A refund settlement: a Refund of ``amount`` of the escrow's PaymentIntent."""
        if not payment_intent_id:
            raise PermanentSettlementError(
                "no_payment_intent", "the escrow has no PaymentIntent to refund"
            )
        refund = await self._client.v1.refunds.create_async(
            params={"payment_intent": payment_intent_id, "amount": amount, "metadata": metadata},
            options={"idempotency_key": key},
        )
        return refund.id


def _connect_account(settlement: Settlement) -> str:
    """The Connect account a release recorded as its destination (never the create body's)."""
    destination = settlement.destination
    if not isinstance(destination, StripeAccountDestination):
        raise PermanentSettlementError(
            "no_payout_destination", "the release records no Connect account"
        )
    return destination.account_id


def raise_if_permanent(exc: stripe.StripeError) -> None:
    """A refusal no retry will change becomes PermanentSettlementError with Stripe's code."""
    if _permanent(exc):
        raise PermanentSettlementError(
            exc.code or type(exc).__name__, exc.user_message or str(exc)
        ) from exc


def _permanent(exc: stripe.StripeError) -> bool:
    return isinstance(
        exc,
        stripe.InvalidRequestError
        | stripe.CardError
        | stripe.PermissionError
        | stripe.AuthenticationError,
    )
