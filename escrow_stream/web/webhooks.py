"""Payment provider webhooks: verify the signature on the raw body, dedupe, turn into commands.

``POST /api/webhooks/stripe``, per delivery:

1. Verify ``Stripe-Signature`` on the raw body with the ``stripe`` library and
   ``STRIPE_WEBHOOK_SECRET`` (stale beyond 5 minutes: the library; more than 5 minutes in the
   future: checked here against the injected clock) → 400 with nothing changed.
2. Map the event to a system command: ``payment_intent.succeeded`` → ConfirmFunds,
   ``payment_intent.payment_failed`` → RecordPaymentFailure, ``transfer.created`` →
   ConfirmSettlement.  ``account.updated`` is no command: it sets the seller's payout
   account ACTIVE (``payouts_enabled``) or back to PENDING, resuming the releases that
   waited for it (``web/payouts.py``; applying it again changes nothing, so it needs no
   dedupe).  ``charge.dispute.created`` → OpenChargeback and ``charge.dispute.closed`` →
   CloseChargeback (``won`` → WON, ``lost`` → LOST, an inquiry's ``warning_closed`` → WON):
   a Dispute carries no escrow metadata, so the escrow is the one whose PaymentIntent it
   names, found in our own records (the INSTRUCTIONS payment effect, else the mirror); an
   unknown PaymentIntent is acknowledged, logged and ignored.  ``charge.refunded`` and
   ``refund.updated`` are no command either: they confirm
   (or, failed, send to review) the refund of unmatched funds (``agents/unmatched.py``;
   idempotent too).  Other types, or events without an escrow id, are acknowledged and
   ignored (Stripe would otherwise retry them for days).
3. The Stripe event id is the idempotency key (and fixes the commandId, but for a transfer
   the payments agent made, whose confirmation is named by its settlement): a redelivered
   event replays the first answer and enqueues nothing; the command, signed with
   ``INTERNAL_COMMAND_SECRET``, goes through the outbox in the same transaction as that
   record, before the 200.  The escrow's own rules decide what the command means (an event
   out of order is rejected there and changes nothing).

The custodian's webhook is ``web/custodian_webhook.py``; both accept commands through
:func:`accept_once`, and both count every delivery through :func:`counted`
(``escrow_webhooks_total{source,result}``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import faust
import stripe
from faust.web import Request, Response, View

from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.db.pool import Database
from escrow_stream.db.queries import escrow_for_payment_intent
from escrow_stream.db.unmatched import funds_id_for, return_key
from escrow_stream.domain import Command
from escrow_stream.intake import IdempotencyKey, Intake, Verdict
from escrow_stream.metrics import WEBHOOKS
from escrow_stream.payments.common import settled_command_id
from escrow_stream.web.gateway import build_command, json_response
from escrow_stream.web.problems import Problem

STRIPE_TOLERANCE_S = 300
STRIPE_ACTOR = {"id": "stripe-webhook", "role": "system"}

log = logging.getLogger(__name__)

#: What became of the delivery being handled, named along the way (``webhook_result``) and
#: counted by :func:`counted` (aiohttp runs each request in a task, so a context of its own).
_result: ContextVar[str] = ContextVar("webhook_result", default="accepted")
#: Problems a webhook answers, as the result they count as (other 4xx: invalid).
PROBLEM_RESULTS = {
    "INVALID_SIGNATURE": "bad_signature",
    "INVALID_EVENT": "invalid",
    "IDEMPOTENCY_IN_FLIGHT": "in_flight",
}


def webhook_result(result: str) -> None:
    """Name what became of the delivery being handled when it is not ``accepted``."""
    _result.set(result)


async def counted(source: str, handle: Callable[[], Awaitable[Response]]) -> Response:
    """Handle one delivery and count it, by ``source`` and result, whatever its answer."""
    _result.set("accepted")
    try:
        response = await handle()
    except Problem as problem:
        result = "error" if problem.status >= 500 else PROBLEM_RESULTS.get(problem.code, "invalid")
        WEBHOOKS.labels(source, result).inc()
        raise
    except Exception:
        WEBHOOKS.labels(source, "error").inc()
        raise
    WEBHOOKS.labels(source, _result.get()).inc()
    return response


#: (provider, reference, done, error, provider object id) → the unmatched funds id it
#: concerned, None when no return of ours (``agents.unmatched.confirm_return``).
ConfirmReturn = Callable[[str, str, bool, str, str | None], Awaitable[str | None]]
#: Stripe's ``account.updated`` event → the answer (``web.payouts.account_updated_handler``).
AccountUpdated = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class WebhookServices:
    """What the webhooks act through, wired by the composition root."""

    settings: Settings
    clock: Clock
    intake: Intake
    database: Database
    confirm_return: ConfirmReturn
    account_updated: AccountUpdated | None = None


def stripe_timestamp(header: str) -> int | None:
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            return int(value)
    return None


def stripe_command(event: dict[str, Any]) -> tuple[str, str, dict[str, Any], str] | None:
    """(command type, escrowId, payload, commandId) for the event types we act on, else None.

    The commandId is ``stripe:{event id}``, except for ``transfer.created``: that confirms
    the settlement named in the transfer's metadata (``settlement_id``, or ``settlement_key``
    on transfers made before SPEC §10), with the commandId the agent uses too, so both
    confirmations are one command, applied once; the escrow refuses it SETTLEMENT_MISMATCH
    unless that settlement is the pending one (a late transfer of attempt 1 never confirms
    attempt 2).  A transfer naming no settlement is ignored."""
    by_event = f"stripe:{event.get('id')}"
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
            by_event,
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
            by_event,
        )
    if kind == "transfer.created":
        escrow_id = escrow_id or obj.get("transfer_group")
        # the settlement id the agent put in the metadata (``settlement_key`` before §10);
        # a transfer that names none is not one of our settlements
        settlement_id = metadata.get("settlement_id") or metadata.get("settlement_key")
        if escrow_id and settlement_id:
            return (
                "ConfirmSettlement",
                escrow_id,
                {
                    "settlementId": settlement_id,
                    "provider": "stripe",
                    "providerReference": obj["id"],
                    "amount": str(obj.get("amount")),
                },
                settled_command_id(settlement_id),
            )
    return None


def stripe_return(event: dict[str, Any]) -> tuple[str, bool, str, str | None] | None:
    """(return key, done, error, Refund id) when the event is Stripe's word on a refund of
    unmatched funds: ``charge.refunded`` (fully refunded: done) or ``refund.updated``
    (succeeded: done; failed or canceled: not done).  Other events, and refunds that are no
    return of ours (they carry no ``unmatched_funds_id``), are None."""
    kind = event.get("type")
    obj = (event.get("data") or {}).get("object") or {}
    if kind == "charge.refunded" and obj.get("refunded") and obj.get("payment_intent"):
        funds_id = funds_id_for("stripe", str(obj["payment_intent"]))
        return return_key(funds_id), True, "", None
    unmatched_id = (obj.get("metadata") or {}).get("unmatched_funds_id")
    if kind == "refund.updated" and unmatched_id:
        status = obj.get("status")
        refund_id = str(obj.get("id"))
        if status == "succeeded":
            return return_key(str(unmatched_id)), True, "", refund_id
        if status in ("failed", "canceled"):
            reason = obj.get("failure_reason") or status
            return return_key(str(unmatched_id)), False, f"refund {refund_id}: {reason}", refund_id
    return None


async def confirm_return_answer(
    services: WebhookServices,
    provider: str,
    reference: str,
    done: bool,
    error: str,
    object_id: str | None,
) -> dict[str, Any]:
    """The webhook's answer to a provider's word on a return of unmatched funds."""
    funds_id = await services.confirm_return(provider, reference, done, error, object_id)
    if funds_id is None:
        webhook_result("ignored")
    return {"received": True, "unmatchedFunds": funds_id}


#: Stripe Dispute statuses on ``charge.dispute.closed``, as the escrow's outcome; an inquiry
#: closed without becoming a chargeback (``warning_closed``) is a win.
DISPUTE_OUTCOMES = {"won": "WON", "lost": "LOST", "warning_closed": "WON"}
DISPUTE_EVENTS = frozenset({"charge.dispute.created", "charge.dispute.closed"})


def dispute_command(event: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(command type, payload) of a Stripe dispute event: ``charge.dispute.created`` →
    OpenChargeback, ``charge.dispute.closed`` (won, lost, warning_closed) → CloseChargeback;
    any other status or type → None."""
    obj = (event.get("data") or {}).get("object") or {}
    dispute_id = obj.get("id")
    if not isinstance(dispute_id, str) or not dispute_id:
        return None
    if event.get("type") == "charge.dispute.created":
        payload = {
            "provider": "stripe",
            "disputeId": dispute_id,
            "chargeId": obj.get("charge") or None,
            "paymentIntentId": obj.get("payment_intent") or None,
            "amount": str(obj.get("amount")),
            "currency": str(obj.get("currency", "")).upper(),
            "reason": str(obj.get("reason") or "unknown")[:200],
        }
        return "OpenChargeback", payload
    outcome = DISPUTE_OUTCOMES.get(str(obj.get("status")))
    if event.get("type") == "charge.dispute.closed" and outcome is not None:
        payload = {"disputeId": dispute_id, "outcome": outcome}
        if isinstance(obj.get("amount"), int):
            payload["amount"] = str(obj["amount"])
        return "CloseChargeback", payload
    return None


async def stripe_dispute(
    view: View, services: WebhookServices, event: dict[str, Any], raw: bytes
) -> Response | None:
    """A chargeback webhook, answered (None: not one).  The Dispute names the PaymentIntent,
    not the escrow: ours is found in our own records (``escrow_for_payment_intent``); an
    unknown one, or a status we do not act on, is acknowledged, logged and ignored.  Once per
    Stripe event id (``accept_once``), like every command-making event."""
    kind = event.get("type")
    if kind not in DISPUTE_EVENTS:
        return None
    obj = (event.get("data") or {}).get("object") or {}
    mapped = dispute_command(event)
    intent = obj.get("payment_intent")
    escrow_id = None
    if mapped is not None and isinstance(intent, str) and intent:
        escrow_id = await escrow_for_payment_intent(await services.database.pool(), intent)
    if mapped is None or escrow_id is None:
        log.warning(
            "stripe %s %s ignored: %s",
            kind,
            obj.get("id"),
            "unknown PaymentIntent" if mapped is not None else "not a dispute we act on",
        )
        webhook_result("ignored")
        return json_response(view, {"received": True, "ignored": kind})
    command_type, payload = mapped
    command_id = f"stripe:{event.get('id')}"
    command = build_command(
        STRIPE_ACTOR, command_type, escrow_id, payload, command_id, services.clock()
    )
    return await accept_once(view, services, "stripe", str(event["id"]), raw, command)


def register(app: faust.App, services: WebhookServices) -> None:
    secret = services.settings.stripe_webhook_secret.get_secret_value()

    @app.page("/api/webhooks/stripe")
    class StripeWebhook(View):
        async def post(self, request: Request) -> Response:
            return await counted("stripe", lambda: self.receive(request))

        async def receive(self, request: Request) -> Response:
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
            if stamp is None or stamp > services.clock().timestamp() + STRIPE_TOLERANCE_S:
                raise Problem(400, "INVALID_SIGNATURE", "the signature is dated in the future")
            event = json.loads(payload)
            if event.get("type") == "account.updated" and services.account_updated:
                return json_response(self, await services.account_updated(event))
            if (disputed := await stripe_dispute(self, services, event, raw)) is not None:
                return disputed
            returned = stripe_return(event)
            if returned is not None:
                answer = await confirm_return_answer(services, "stripe", *returned)
                return json_response(self, answer)
            mapped = stripe_command(event)
            if mapped is None:
                webhook_result("ignored")
                return json_response(self, {"received": True, "ignored": event.get("type")})
            command_type, escrow_id, command_payload, command_id = mapped
            command = build_command(
                STRIPE_ACTOR, command_type, escrow_id, command_payload, command_id, services.clock()
            )
            return await accept_once(self, services, "stripe", str(event["id"]), raw, command)


async def accept_once(
    view: View,
    services: WebhookServices,
    provider: str,
    event_id: str,
    raw: bytes,
    command: Command,
) -> Response:
    """Step 3: the first delivery enqueues; every later one replays the same answer."""
    # the idempotency records' namespace is the provider's; the event id is the key
    key = IdempotencyKey(f"webhook:{provider}", event_id, hashlib.sha256(raw).hexdigest())
    answer = {"received": True, "commandId": command.command_id}
    receipt = await services.intake.accept(command, answer, status=200, key=key)
    if receipt.verdict is Verdict.IN_FLIGHT:
        raise Problem(409, "IDEMPOTENCY_IN_FLIGHT", "this event is being processed")
    # KEY_REUSED: the event resent with new fields — answered like a replay
    if receipt.verdict is not Verdict.ACCEPTED:
        webhook_result("duplicate")
    return json_response(view, receipt.body or answer, 200)
