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

``POST /api/webhooks/custodian``, per delivery:

1. ``X-Custodian-Signature`` must be the hex HMAC-SHA256, keyed with
   ``CUSTODIAN_WEBHOOK_SECRET``, of ``{X-Custodian-Timestamp}.{raw body}`` (compared in
   constant time), and the timestamp within 5 minutes of the injected clock, either way →
   else 400 with nothing changed.
2. ``deposit.confirmed`` (``data``: ``id``, ``address``, ``reference`` = escrowId,
   ``fromAddress``, ``amount``, ``asset``, ``confirmations``, ``txHash``): below
   ``CUSTODIAN_MIN_CONFIRMATIONS`` it is acknowledged and not recorded (the custodian reports
   again with more); else the deposit is recorded once per deposit id for risk screening
   (``agents.screening``), which alone may confirm the funds.
3. ``transfer.completed`` → ConfirmSettlement and ``transfer.failed`` →
   RecordSettlementFailure, for the escrow in ``data.metadata.escrow_id`` and the settlement
   the agent made the transfer for (``data.reference`` = the settlement id, which the
   command names: SETTLEMENT_MISMATCH unless it is the pending one), once per event id as
   for Stripe.  A transfer whose reference is ``unmatched:…`` is the return of unmatched
   funds to their sender: ``transfer.completed`` makes them RETURNED, ``transfer.failed``
   NEEDS_REVIEW, with no command.  Other types are acknowledged and ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

import faust
import stripe
from faust.web import Request, Response, View

from escrow_stream.agents.unmatched import confirm_return
from escrow_stream.db import deposits
from escrow_stream.db.deposits import Deposit
from escrow_stream.db.queries import escrow_for_payment_intent
from escrow_stream.db.unmatched import funds_id_for, is_return_key, return_key
from escrow_stream.domain import Command
from escrow_stream.idempotency import BeginKind
from escrow_stream.payments.common import settled_command_id
from escrow_stream.payments.custodian import is_address
from escrow_stream.web.gateway import Gateway, json_response
from escrow_stream.web.problems import Problem

STRIPE_TOLERANCE_S = 300
CUSTODIAN_TOLERANCE_S = 300
CUSTODIAN_ACTOR = {"id": "custodian-webhook", "role": "system"}
STRIPE_ACTOR = {"id": "stripe-webhook", "role": "system"}

log = logging.getLogger(__name__)


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


async def _confirm_return(
    gateway: Gateway, provider: str, reference: str, done: bool, error: str, object_id: str | None
) -> dict[str, Any]:
    database, clock = gateway.database, gateway.clock
    funds_id = await confirm_return(database, clock, provider, reference, done, error, object_id)
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
    view: View, gateway: Gateway, event: dict[str, Any], raw: bytes
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
        escrow_id = await escrow_for_payment_intent(await gateway.database.pool(), intent)
    if mapped is None or escrow_id is None:
        log.warning(
            "stripe %s %s ignored: %s",
            kind,
            obj.get("id"),
            "unknown PaymentIntent" if mapped is not None else "not a dispute we act on",
        )
        return json_response(view, {"received": True, "ignored": kind})
    command_type, payload = mapped
    command = gateway.build_command(
        STRIPE_ACTOR, command_type, escrow_id, payload, f"stripe:{event.get('id')}"
    )
    return await accept_once(view, gateway, "stripe", str(event["id"]), raw, command)


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
            if event.get("type") == "account.updated" and gateway.on_account_updated:
                return json_response(self, await gateway.on_account_updated(event))
            if (disputed := await stripe_dispute(self, gateway, event, raw)) is not None:
                return disputed
            returned = stripe_return(event)
            if returned is not None:
                return json_response(self, await _confirm_return(gateway, "stripe", *returned))
            mapped = stripe_command(event)
            if mapped is None:
                return json_response(self, {"received": True, "ignored": event.get("type")})
            command_type, escrow_id, command_payload, command_id = mapped
            command = gateway.build_command(
                STRIPE_ACTOR, command_type, escrow_id, command_payload, command_id
            )
            return await accept_once(self, gateway, "stripe", str(event["id"]), raw, command)


async def accept_once(
    view: View, gateway: Gateway, provider: str, event_id: str, raw: bytes, command: Command
) -> Response:
    """Step 3: the first delivery enqueues; every later one replays the same answer."""
    user = f"webhook:{provider}"  # the idempotency records' namespace
    digest = hashlib.sha256(raw).hexdigest()
    begun = await gateway.begin_idempotent(user, event_id, digest)
    answer = {"received": True, "commandId": command.command_id}
    if begun.kind in (BeginKind.REPLAY, BeginKind.MISMATCH):  # mismatch: resent, new fields
        return json_response(view, begun.body or answer, 200)
    if begun.kind is BeginKind.CONFLICT_IN_FLIGHT:
        raise Problem(409, "IDEMPOTENCY_IN_FLIGHT", "this event is being processed")
    try:
        await gateway.enqueue(user, event_id, command, answer, status=200)
    except BaseException:
        await gateway.idempotency.abandon(user, event_id)
        raise
    return json_response(view, answer, 200)


def custodian_signature(secret: str, timestamp: str, raw: bytes) -> str:
    """What the custodian sends in ``X-Custodian-Signature`` (step 1)."""
    message = timestamp.encode() + b"." + raw
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify_custodian(
    secret: str, timestamp: str | None, signature: str | None, raw: bytes, now_s: float
) -> None:
    """Step 1; raises a 400 Problem."""
    if not timestamp or not signature:
        raise Problem(400, "INVALID_SIGNATURE", "X-Custodian-Timestamp and -Signature needed")
    expected = custodian_signature(secret, timestamp, raw)
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        raise Problem(400, "INVALID_SIGNATURE", "the signature does not match the body")
    try:
        stamp = int(timestamp)
    except ValueError:
        raise Problem(400, "INVALID_SIGNATURE", "the timestamp is not a number") from None
    if abs(now_s - stamp) > CUSTODIAN_TOLERANCE_S:
        raise Problem(400, "INVALID_SIGNATURE", "the timestamp is outside the 5-minute window")


def custodian_deposit(data: dict[str, Any]) -> Deposit:
    """Step 2's deposit, or a 400 Problem naming what is missing."""
    try:
        deposit = Deposit(
            deposit_id=_text(data, "id"),
            escrow_id=_text(data, "reference"),
            deposit_address=_text(data, "address"),
            sender_address=_text(data, "fromAddress"),
            tx_hash=str(data["txHash"]) if data.get("txHash") else None,
            amount=_amount(data.get("amount")),
            asset=_text(data, "asset").upper(),
            confirmations=int(data.get("confirmations", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Problem(400, "INVALID_EVENT", f"deposit.confirmed: {exc}") from None
    if deposit.asset != "USDC" or not is_address(deposit.sender_address):
        raise Problem(400, "INVALID_EVENT", "deposit.confirmed: not USDC from an address")
    return deposit


def custodian_command(event: dict[str, Any]) -> tuple[str, str, dict[str, Any], str] | None:
    """Step 3: (command type, escrowId, payload, commandId) for a transfer event, else None.

    The commandId is the event's own (``custodian:{event id}``), not the settlement's: an
    event that arrives before its settlement is pending is refused by the escrow, and a
    refusal recorded under the settlement's id would also refuse the genuine event later."""
    kind = event.get("type")
    data = event.get("data") or {}
    key = data.get("reference")
    escrow_id = (data.get("metadata") or {}).get("escrow_id")
    if not key or not escrow_id or kind not in ("transfer.completed", "transfer.failed"):
        return None
    payload: dict[str, Any]
    if kind == "transfer.completed":
        payload = {
            "settlementId": key,
            "provider": "custodian",
            "providerReference": str(data.get("id")),
            "amount": str(data.get("amount")),
        }
        return "ConfirmSettlement", escrow_id, payload, f"custodian:{event.get('id')}"
    error = data.get("error") or {}
    payload = {
        "settlementId": key,
        "errorCode": str(error.get("code") or "transfer_failed")[:200],
        "errorMessage": str(error.get("message") or "")[:2000],
        "retryable": False,
    }
    return "RecordSettlementFailure", escrow_id, payload, f"custodian:{event.get('id')}"


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} missing")
    return value


def _amount(value: object) -> int:
    if not isinstance(value, str) or not value.isdigit() or int(value) <= 0:
        raise ValueError("amount must be a string of base units")
    return int(value)


def register_custodian(app: faust.App, gateway: Gateway) -> None:
    settings = gateway.settings
    secret = settings.custodian_webhook_secret.get_secret_value()

    @app.page("/api/webhooks/custodian")
    class CustodianWebhook(View):
        async def post(self, request: Request) -> Response:
            raw = await request.read()
            verify_custodian(
                secret,
                request.headers.get("X-Custodian-Timestamp"),
                request.headers.get("X-Custodian-Signature"),
                raw,
                gateway.clock().timestamp(),
            )
            try:
                event = json.loads(raw)
                event_id = str(event["id"])
                kind = str(event["type"])
            except (ValueError, KeyError, TypeError):
                raise Problem(400, "INVALID_EVENT", "not a custodian event") from None
            if kind == "deposit.confirmed":
                deposit = custodian_deposit(event.get("data") or {})
                if deposit.confirmations < settings.custodian_min_confirmations:
                    return json_response(
                        self, {"received": True, "ignored": "awaiting confirmations"}
                    )
                pool = await gateway.database.pool()
                topic = settings.kafka_commands_topic
                new = await deposits.record(pool, deposit, topic, gateway.clock())
                return json_response(
                    self, {"received": True, "depositId": deposit.deposit_id, "new": new}
                )
            reference = str((event.get("data") or {}).get("reference") or "")
            if kind in ("transfer.completed", "transfer.failed") and is_return_key(reference):
                data = event.get("data") or {}
                error = json.dumps(data.get("error") or {})[:2000]
                done = kind == "transfer.completed"
                transfer_id = str(data["id"]) if data.get("id") else None
                answer = await _confirm_return(
                    gateway, "custodian", reference, done, error, transfer_id
                )
                return json_response(self, answer)
            mapped = custodian_command(event)
            if mapped is None:
                return json_response(self, {"received": True, "ignored": kind})
            command_type, escrow_id, payload, command_id = mapped
            command = gateway.build_command(
                CUSTODIAN_ACTOR, command_type, escrow_id, payload, command_id
            )
            return await accept_once(self, gateway, "custodian", event_id, raw, command)
