"""The custodian's webhook (USDC on Base): verify the signature, record deposits, turn
transfers into commands.

``POST /api/webhooks/custodian``, per delivery:

1. ``X-Custodian-Signature`` must be the hex HMAC-SHA256, keyed with
   ``CUSTODIAN_WEBHOOK_SECRET``, of ``{X-Custodian-Timestamp}.{raw body}`` (compared in
   constant time), and the timestamp within 5 minutes of the injected clock, either way →
   else 400 with nothing changed.
2. ``deposit.confirmed`` (``data``: ``id``, ``address``, ``reference`` = escrowId,
   ``fromAddress``, ``amount``, ``asset``, ``confirmations``, ``txHash``): below
   ``CUSTODIAN_MIN_CONFIRMATIONS`` it is acknowledged and not recorded (the custodian reports
   again with more); else the deposit is recorded once per deposit id for risk screening
   (``agents.deposit_screening``), which alone may confirm the funds.
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
from typing import Any

import faust
from faust.web import Request, Response, View

from escrow_stream.db.deposits import Deposit
from escrow_stream.db.unmatched import is_return_key
from escrow_stream.payments.custodian import is_address
from escrow_stream.web.gateway import build_command, json_response
from escrow_stream.web.problems import Problem
from escrow_stream.web.webhooks import (
    WebhookServices,
    accept_once,
    confirm_return_answer,
    counted,
    webhook_result,
)

CUSTODIAN_TOLERANCE_S = 300
CUSTODIAN_ACTOR = {"id": "custodian-webhook", "role": "system"}


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


def register(app: faust.App, services: WebhookServices) -> None:
    settings = services.settings
    secret = settings.custodian_webhook_secret.get_secret_value()

    @app.page("/api/webhooks/custodian")
    class CustodianWebhook(View):
        async def post(self, request: Request) -> Response:
            return await counted("custodian", lambda: self.receive(request))

        async def receive(self, request: Request) -> Response:
            raw = await request.read()
            verify_custodian(
                secret,
                request.headers.get("X-Custodian-Timestamp"),
                request.headers.get("X-Custodian-Signature"),
                raw,
                services.clock().timestamp(),
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
                    webhook_result("ignored")
                    return json_response(
                        self, {"received": True, "ignored": "awaiting confirmations"}
                    )
                new = await services.intake.record_deposit(deposit)
                if not new:
                    webhook_result("duplicate")
                return json_response(
                    self, {"received": True, "depositId": deposit.deposit_id, "new": new}
                )
            reference = str((event.get("data") or {}).get("reference") or "")
            if kind in ("transfer.completed", "transfer.failed") and is_return_key(reference):
                data = event.get("data") or {}
                error = json.dumps(data.get("error") or {})[:2000]
                done = kind == "transfer.completed"
                transfer_id = str(data["id"]) if data.get("id") else None
                answer = await confirm_return_answer(
                    services, "custodian", reference, done, error, transfer_id
                )
                return json_response(self, answer)
            mapped = custodian_command(event)
            if mapped is None:
                webhook_result("ignored")
                return json_response(self, {"received": True, "ignored": kind})
            command_type, escrow_id, payload, command_id = mapped
            command = build_command(
                CUSTODIAN_ACTOR, command_type, escrow_id, payload, command_id, services.clock()
            )
            return await accept_once(self, services, "custodian", event_id, raw, command)
