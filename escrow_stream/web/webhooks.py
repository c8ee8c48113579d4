"""Payment provider webhooks: verify the signature on the raw body, dedupe, turn into commands.

``POST /api/webhooks/stripe``, per delivery:

1. Verify ``Stripe-Signature`` on the raw body with the ``stripe`` library and
   ``STRIPE_WEBHOOK_SECRET`` (stale beyond 5 minutes: the library; more than 5 minutes in the
   future: checked here against the injected clock) → 400 with nothing changed.
2. Map the event to a system command: ``payment_intent.succeeded`` → ConfirmFunds,
   ``payment_intent.payment_failed`` → RecordPaymentFailure, ``transfer.created`` →
   ConfirmSettlement.  Other types, or events without an escrow id, are acknowledged and
   ignored (Stripe would otherwise retry them for days).
3. The Stripe event id is the idempotency key (and fixes the commandId): a redelivered event
   replays the first answer and enqueues nothing; the command, signed with
   ``INTERNAL_COMMAND_SECRET``, goes through the outbox in the same transaction as that
   record, before the 200.  The escrow's own rules decide what the command means (an event
   out of order is rejected there and changes nothing).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import faust
import stripe
from faust.web import Request, Response, View

from escrow_stream.domain import Command
from escrow_stream.idempotency import BeginKind
from escrow_stream.web.gateway import Gateway, json_response
from escrow_stream.web.problems import Problem

STRIPE_TOLERANCE_S = 300
STRIPE_ACTOR = {"id": "stripe-webhook", "role": "system"}
WEBHOOK_USER = "webhook:stripe"


def stripe_timestamp(header: str) -> int | None:
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            return int(value)
    return None


def stripe_command(event: dict[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    """(command type, escrowId, payload) for the event types we act on, else None."""
    kind = event.get("type")
    obj = (event.get("data") or {}).get("object") or {}
    metadata = obj.get("metadata") or {}
    escrow_id = metadata.get("escrow_id")
    if kind == "payment_intent.succeeded" and escrow_id:
        amount = obj.get("amount_received") or obj.get("amount")
        return (
            "ConfirmFunds",
            escrow_id,
            {
                "provider": "stripe",
                "providerPaymentId": obj["id"],
                "amount": str(amount),
                "currency": str(obj.get("currency", "")).upper(),
            },
        )
    if kind == "payment_intent.payment_failed" and escrow_id:
        error = obj.get("last_payment_error") or {}
        return (
            "RecordPaymentFailure",
            escrow_id,
            {
                "provider": "stripe",
                "providerPaymentId": obj["id"],
                "errorCode": str(error.get("code") or "payment_failed")[:200],
                "errorMessage": str(error.get("message") or "")[:2000],
            },
        )
    if kind == "transfer.created":
        escrow_id = escrow_id or obj.get("transfer_group")
        if escrow_id:
            return (
                "ConfirmSettlement",
                escrow_id,
                {
                    "provider": "stripe",
                    "providerReference": obj["id"],
                    "amount": str(obj.get("amount")),
                },
            )
    return None


def register(app: faust.App, gateway: Gateway) -> None:
    secret = gateway.settings.stripe_webhook_secret.get_secret_value()

    @app.page("/api/webhooks/stripe")
    class StripeWebhook(View):
        async def post(self, request: Request) -> Response:
            raw = await request.read()
            header = request.headers.get("Stripe-Signature")
            if not header:
                raise Problem(400, "INVALID_SIGNATURE", "the Stripe-Signature header is missing")
            try:
                payload = raw.decode("utf-8")
                stripe.WebhookSignature.verify_header(payload, header, secret, STRIPE_TOLERANCE_S)
            except (stripe.SignatureVerificationError, UnicodeDecodeError) as exc:
                raise Problem(400, "INVALID_SIGNATURE", f"signature check failed: {exc}") from None
            stamp = stripe_timestamp(header)
            if stamp is None or stamp > gateway.clock().timestamp() + STRIPE_TOLERANCE_S:
                raise Problem(400, "INVALID_SIGNATURE", "the signature is dated in the future")
            event = json.loads(payload)
            mapped = stripe_command(event)
            if mapped is None:
                return json_response(self, {"received": True, "ignored": event.get("type")})
            command_type, escrow_id, command_payload = mapped
            command = gateway.build_command(
                STRIPE_ACTOR, command_type, escrow_id, command_payload, f"stripe:{event['id']}"
            )
            return await accept_once(self, gateway, str(event["id"]), raw, command)


async def accept_once(
    view: View, gateway: Gateway, event_id: str, raw: bytes, command: Command
) -> Response:
    """Step 3: the first delivery enqueues; every later one replays the same answer."""
    digest = hashlib.sha256(raw).hexdigest()
    begun = await gateway.begin_idempotent(WEBHOOK_USER, event_id, digest)
    answer = {"received": True, "commandId": command.command_id}
    if begun.kind in (BeginKind.REPLAY, BeginKind.MISMATCH):  # mismatch: resent, new fields
        return json_response(view, begun.body or answer, 200)
    if begun.kind is BeginKind.CONFLICT_IN_FLIGHT:
        raise Problem(409, "IDEMPOTENCY_IN_FLIGHT", "this event is being processed")
    try:
        await gateway.enqueue(WEBHOOK_USER, event_id, command, answer, status=200)
    except BaseException:
        await gateway.idempotency.abandon(WEBHOOK_USER, event_id)
        raise
    return json_response(view, answer, 200)
