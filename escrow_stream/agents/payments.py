"""The payments-effects agent: events in, provider calls out, results back as commands.

Per event on ``escrow.events.v1`` (SPEC §5), in order:

1. ``EscrowCreated`` on the STRIPE rail, with no payment instructions yet: create the
   PaymentIntent (idempotency key from the escrow id).
2. Send ``RecordPaymentInstructions`` as a signed system command with a commandId derived
   from the escrow, so a redelivered event yields the same command, applied once.
3. A provider error is retried with capped exponential backoff while the worker consumes
   (the SDK already retries network errors ``ESCROW_MAX_RETRIES`` times); the event's offset
   is not committed meanwhile, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import faust

from escrow_stream.agents.processor import encode_command
from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.domain import parse_command
from escrow_stream.payments.stripe_rail import StripeRail
from escrow_stream.signing import signature_headers

log = logging.getLogger(__name__)

ACTOR = {"id": "payments-agent", "role": "system"}
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0


def register(
    app: faust.App,
    settings: Settings,
    clock: Clock,
    events_topic: faust.TopicT,
    commands_topic: faust.TopicT,
    stripe_rail: StripeRail,
) -> None:
    secret = settings.internal_command_secret.get_secret_value()

    async def instructions_for(escrow: dict[str, Any]) -> dict[str, Any]:
        delay_s = RETRY_INITIAL_S
        while True:
            try:
                return await stripe_rail.payment_instructions(escrow)
            except Exception as exc:
                if app.should_stop:
                    raise
                log.warning(
                    "stripe: creating the PaymentIntent of %s failed, retry in %.0f s: %s",
                    escrow["escrowId"],
                    delay_s,
                    exc,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(RETRY_MAX_S, delay_s * 2)

    @app.agent(events_topic, name="payments-effects")
    async def payments_effects(stream: faust.StreamT[bytes]) -> None:
        async for value in stream:
            event = json.loads(value)
            escrow = event.get("escrow") or {}
            if not (
                event.get("type") == "EscrowCreated"
                and escrow.get("rail") == "STRIPE"
                and not escrow.get("payment")
            ):
                continue
            payload = await instructions_for(escrow)
            command = parse_command(
                {
                    "schemaVersion": 1,
                    "commandId": f"payments:instructions:{escrow['escrowId']}",
                    "type": "RecordPaymentInstructions",
                    "escrowId": escrow["escrowId"],
                    "actor": ACTOR,
                    "payload": payload,
                    "issuedAt": clock().isoformat(),
                    "causationId": event.get("eventId"),
                    "correlationId": event.get("correlationId"),
                }
            )
            body = encode_command(command)
            await commands_topic.send(
                key=command.escrow_id.encode(),
                value=body,
                headers=signature_headers(secret, body),
            )
