"""The payments-effects agent: events in, provider calls out, results back as commands.

Per event on ``escrow.events.v1`` (SPEC §5), in order:

1. Pick the escrow's rail: Stripe (USD) or the custodian (USDC on Base).
   ``EscrowCreated`` with no payment instructions yet: a PaymentIntent, or a deposit
   address (idempotency key from the escrow id) → ``RecordPaymentInstructions``.
   ``SettlementRequested`` while that settlement is still pending: a Transfer / Refund, or a
   custodian transfer (idempotency key from escrow, milestone and attempt) →
   ``ConfirmSettlement`` when the provider answers with the result (Stripe), nothing when the
   result comes later by webhook (the custodian's ``transfer.completed``), or
   ``RecordSettlementFailure`` when the provider refuses for good.
2. Send the command signed, with a commandId derived from the same ids
   (``payments:settled:{settlement key}``, which Stripe's ``transfer.created`` webhook for
   the same transfer uses too), so a redelivered event or a second confirmation is the same
   command, applied once.
3. An error whose outcome is unknown (5xx, timeout, connection lost) is retried with the
   same idempotency key, with exponential backoff from ``ESCROW_RETRY_DELAY_MS`` capped at
   60 s, for as long as it takes; each round the client already retried
   ``ESCROW_MAX_RETRIES`` times.  It is never turned into a settlement failure: the money may
   have moved, and a failure would let a later attempt (a new key) move it again.  The
   event's offset is not committed meanwhile, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import faust

from escrow_stream.agents.processor import encode_command, make_command
from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.payments.common import (
    PermanentSettlementError,
    failed_command_id,
    settled_command_id,
    settlement_key,
)
from escrow_stream.signing import signature_headers

log = logging.getLogger(__name__)

ACTOR = {"id": "payments-agent", "role": "system"}
RETRY_MIN_S = 0.05
RETRY_MAX_S = 60.0

T = TypeVar("T")


class Rail(Protocol):
    """One payment provider, as the agent drives it (escrows as their JSON snapshots)."""

    async def payment_instructions(self, escrow: dict[str, Any]) -> dict[str, Any]:
        """The RecordPaymentInstructions payload; the same escrow gives the same object."""
        ...

    async def settle(self, escrow: dict[str, Any]) -> dict[str, Any] | None:
        """Perform the pending settlement: the ConfirmSettlement payload, or None when the
        provider reports completion later by webhook.  Raises PermanentSettlementError."""
        ...


def register(
    app: faust.App,
    settings: Settings,
    clock: Clock,
    events_topic: faust.TopicT,
    commands_topic: faust.TopicT,
    rails: dict[str, Rail],
) -> None:
    secret = settings.internal_command_secret.get_secret_value()
    first_delay_s = max(RETRY_MIN_S, settings.escrow_retry_delay_ms / 1000)

    async def retrying(what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Step 3: retry what may pass later; PermanentSettlementError goes to the caller."""
        delay_s = first_delay_s
        rounds = 0
        while True:
            try:
                return await call()
            except PermanentSettlementError:
                raise
            except Exception as exc:
                if app.should_stop:
                    raise
                rounds += 1
                log.warning("%s failed (round %d), retry in %.2f s: %s", what, rounds, delay_s, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(RETRY_MAX_S, delay_s * 2)

    async def send(
        event: dict[str, Any], type_: str, command_id: str, payload: dict[str, Any]
    ) -> None:
        """Step 2: a signed system command whose id derives from the event's subject."""
        command = make_command(
            ACTOR,
            type_,
            event["escrowId"],
            payload,
            command_id,
            clock(),
            causation_id=event.get("eventId"),
            correlation_id=event.get("correlationId"),
        )
        body = encode_command(command)
        await commands_topic.send(
            key=command.escrow_id.encode(), value=body, headers=signature_headers(secret, body)
        )

    async def on_created(rail: Rail, event: dict[str, Any], escrow: dict[str, Any]) -> None:
        payload = await retrying(
            f"payment instructions of {escrow['escrowId']}",
            lambda: rail.payment_instructions(escrow),
        )
        await send(
            event,
            "RecordPaymentInstructions",
            f"payments:instructions:{escrow['escrowId']}",
            payload,
        )

    async def on_settlement(rail: Rail, event: dict[str, Any], escrow: dict[str, Any]) -> None:
        settlement = escrow["settlement"]
        key = settlement_key(escrow["escrowId"], settlement)
        try:
            payload = await retrying(key, lambda: rail.settle(escrow))
        except PermanentSettlementError as exc:
            await send(
                event,
                "RecordSettlementFailure",
                failed_command_id(key),
                {
                    "errorCode": exc.code[:200],
                    "errorMessage": str(exc)[:2000],
                    "retryable": False,
                },
            )
            return
        if payload is not None:
            await send(event, "ConfirmSettlement", settled_command_id(key), payload)

    @app.agent(events_topic, name="payments-effects")
    async def payments_effects(stream: faust.StreamT[bytes]) -> None:
        async for value in stream:
            event = json.loads(value)
            escrow = event.get("escrow") or {}
            rail = rails.get(escrow.get("rail", ""))
            if rail is None:
                continue
            if event.get("type") == "EscrowCreated" and not escrow.get("payment"):
                await on_created(rail, event, escrow)
            elif event.get("type") == "SettlementRequested" and is_current(event, escrow):
                await on_settlement(rail, event, escrow)


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
