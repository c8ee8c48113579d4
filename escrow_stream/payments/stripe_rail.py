"""The Stripe rail (USD), "separate charges and transfers" (SPEC §5), with the ``stripe`` SDK.

Every call carries an idempotency key derived from the escrow (never from time or
randomness), so a redelivered event asks Stripe for the same object again and gets it.
``STRIPE_API_BASE`` points the SDK at stripe-mock in development and tests.
"""

from __future__ import annotations

from typing import Any

import stripe

from escrow_stream.config import Settings


def payment_intent_key(escrow_id: str) -> str:
    return f"escrow-payment-intent:{escrow_id}"


class StripeRail:
    def __init__(self, settings: Settings) -> None:
        base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
        self._client = stripe.StripeClient(
            settings.stripe_secret_key.get_secret_value(),
            base_addresses=base,  # type: ignore[arg-type]
            http_client=stripe.HTTPXClient(),
            max_network_retries=settings.escrow_max_retries,
        )

    async def payment_instructions(self, escrow: dict[str, Any]) -> dict[str, Any]:
        """Create (or get again) the escrow's PaymentIntent: the RecordPaymentInstructions
        payload the buyer's front end needs (id and client secret)."""
        escrow_id = escrow["escrowId"]
        intent = await self._client.v1.payment_intents.create_async(
            params={
                "amount": int(escrow["amount"]),
                "currency": str(escrow["currency"]).lower(),
                "metadata": {"escrow_id": escrow_id},
                "transfer_group": escrow_id,
            },
            options={"idempotency_key": payment_intent_key(escrow_id)},
        )
        return {
            "provider": "stripe",
            "providerPaymentId": intent.id,
            "clientSecret": intent.client_secret,
        }
