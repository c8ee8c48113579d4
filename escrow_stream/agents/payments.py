"""The payments-effects agent: events in, provider calls out, results back as commands.

Per event on ``escrow.events.v1`` (SPEC §5), in order:

1. ``EscrowCreated`` on the STRIPE rail, with no payment instructions yet: create the
   PaymentIntent (idempotency key from the escrow id) → ``RecordPaymentInstructions``.
   ``SettlementRequested`` while that settlement is still pending: a Transfer (release) or
   a Refund (idempotency key from escrow, milestone and attempt) → ``ConfirmSettlement``,
   or ``RecordSettlementFailure`` when Stripe refuses for good.
2. Send the command signed, with a commandId derived from the same ids, so a redelivered
   event yields the same command, applied once.
3. A provider error is retried with capped exponential backoff while the worker consumes
   (the SDK already retries network errors ``ESCROW_MAX_RETRIES`` times); the event's offset
   is not committed meanwhile, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import faust

from escrow_stream.agents.processor import encode_command
from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.domain import parse_command
from escrow_stream.payments.stripe_rail import PermanentSettlementError, StripeRail, settlement_key
from escrow_stream.signing import signature_headers

log = logging.getLogger(__name__)

ACTOR = {"id": "payments-agent", "role": "system"}
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0

T = TypeVar("T")


def register(
    app: faust.App,
    settings: Settings,
    clock: Clock,
    events_topic: faust.TopicT,
    commands_topic: faust.TopicT,
    stripe_rail: StripeRail,
) -> None:
    secret = settings.internal_command_secret.get_secret_value()

    async def retrying(what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Step 3: retry what may pass later; PermanentSettlementError goes to the caller."""
        delay_s = RETRY_INITIAL_S
        while True:
            try:
                return await call()
            except PermanentSettlementError:
                raise
            except Exception as exc:
                if app.should_stop:
                    raise
                log.warning("%s failed, retry in %.0f s: %s", what, delay_s, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(RETRY_MAX_S, delay_s * 2)

    async def send(
        event: dict[str, Any], type_: str, command_id: str, payload: dict[str, Any]
    ) -> None:
        """Step 2: a signed system command whose id derives from the event's subject."""
        command = parse_command(
            {
                "schemaVersion": 1,
                "commandId": command_id,
                "type": type_,
                "escrowId": event["escrowId"],
                "actor": ACTOR,
                "payload": payload,
                "issuedAt": clock().isoformat(),
                "causationId": event.get("eventId"),
                "correlationId": event.get("correlationId"),
            }
        )
        body = encode_command(command)
        await commands_topic.send(
            key=command.escrow_id.encode(), value=body, headers=signature_headers(secret, body)
        )

    async def on_created(event: dict[str, Any], escrow: dict[str, Any]) -> None:
        payload = await retrying(
            f"stripe: PaymentIntent of {escrow['escrowId']}",
            lambda: stripe_rail.payment_instructions(escrow),
        )
        await send(
            event,
            "RecordPaymentInstructions",
            f"payments:instructions:{escrow['escrowId']}",
            payload,
        )

    async def on_settlement(event: dict[str, Any], escrow: dict[str, Any]) -> None:
        settlement = escrow["settlement"]
        key = settlement_key(escrow["escrowId"], settlement)
        try:
            payload = await retrying(f"stripe: {key}", lambda: stripe_rail.settle(escrow))
        except PermanentSettlementError as exc:
            await send(
                event,
                "RecordSettlementFailure",
                f"payments:failed:{key}",
                {
                    "errorCode": exc.code[:200],
                    "errorMessage": str(exc)[:2000],
                    "retryable": False,
                },
            )
            return
        await send(event, "ConfirmSettlement", f"payments:settled:{key}", payload)

    @app.agent(events_topic, name="payments-effects")
    async def payments_effects(stream: faust.StreamT[bytes]) -> None:
        async for value in stream:
            event = json.loads(value)
            escrow = event.get("escrow") or {}
            if escrow.get("rail") != "STRIPE":
                continue  # the custodian rail is not wired yet
            if event.get("type") == "EscrowCreated" and not escrow.get("payment"):
                await on_created(event, escrow)
            elif event.get("type") == "SettlementRequested" and is_current(event, escrow):
                await on_settlement(event, escrow)


def is_current(event: dict[str, Any], escrow: dict[str, Any]) -> bool:
    """A re-emitted SettlementRequested carries today's snapshot: act only while that very
    settlement is still pending."""
    settlement: dict[str, Any] = escrow.get("settlement") or {}
    data: dict[str, Any] = event.get("data") or {}
    return (
        bool(settlement)
        and settlement.get("attempt") == data.get("attempt")
        and settlement.get("milestoneId") == data.get("milestoneId")
    )
