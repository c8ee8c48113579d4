"""The payments-effects agent: events in, provider calls out, results back as commands.

Per event on ``escrow.events.v1`` (SPEC §5, §10), in the stream, in order:

1. Pick the effect the event asks for: ``EscrowCreated`` with no payment instructions yet →
   the escrow's PaymentIntent or deposit address (effect ``instructions:{escrowId}``); an
   event whose snapshot carries a settlement with status PENDING (``SettlementRequested``,
   or the same settlement requested again once its payout account is ACTIVE) → that
   settlement's transfer / refund (effect = the settlement id); ``EscrowCancelled`` of an
   unfunded STRIPE escrow → the cancellation of its PaymentIntent, so the buyer can no
   longer pay it (effect ``cancel-instructions:{escrowId}``).  Nothing else.
2. Skip it when it is no longer current: the PostgreSQL mirror already holds a newer version
   of the escrow on which that settlement is not pending (or that already has its payment
   instructions) — an old event read again by an offset reset or a new consumer group.
3. Record the effect in ``payment_effects`` as STARTED, due now — once: an effect recorded
   before, in any state, is left as it is, so a redelivered or replayed event never reaches
   a provider again, whatever the provider's idempotency window.  The event is then
   acknowledged: no provider call happens in the stream, so no escrow waits for another
   (only PostgreSQL being down holds the stream, retried with backoff: it is every escrow's).
3a. Chargebacks (SPEC §10): a settlement whose newest known snapshot shows an OPEN
   chargeback is recorded (or, recorded before and still STARTED, marked) ``held``: the
   runner skips it; an event showing it PENDING with no open chargeback (won) releases the
   hold and makes it due now, with the same key.
3b. ``EscrowRefunded`` with reason CHARGEBACK (lost on held funds): the escrow's held
   settlement effects become FAILED ``chargeback_lost``, with no command and no call.

The effect runner, a task in every worker (woken by step 3, else every ``POLL_S``):

4. Lease due STARTED effects of this deployment (its commands topic; ``FOR UPDATE SKIP
   LOCKED``; ``next_attempt_at`` pushed past one call round), up to ``IN_FLIGHT_MAX`` at
   once, each performed in its own task.
5. Call the provider with the effect's own idempotency key (the settlement id; for
   instructions a key from the escrow id); its client retries ``ESCROW_MAX_RETRIES`` times.
   A release of 0 (the fee is the whole amount) calls nobody: it is answered here.  A
   PaymentIntent cancellation waits for the escrow's PaymentIntent effect to be answered
   (none made, or refused: nothing to cancel); Stripe's refusal (it succeeded meanwhile)
   is recorded FAILED with no command: that payment is refunded as unmatched funds.
6. An answer → in one PostgreSQL transaction, the effect SUCCEEDED (provider object id; the
   Stripe client secret kept there for the buyer alone, never in a command) and its result
   command in the outbox: RecordPaymentInstructions, or ConfirmSettlement naming the
   settlement (a custodian transfer is confirmed by its ``transfer.completed`` webhook).
   A permanent refusal (``PermanentSettlementError``: Stripe ``invalid_request_error`` and
   the like, custodian 4xx) → likewise FAILED with the provider's code, and
   RecordSettlementFailure (``retryable: false``) or RecordPaymentFailure (the escrow stays
   AWAIT_FUNDS with the failure visible and times out; README "PaymentIntent refused").
   An unknown outcome (5xx, timeout, lost connection) → still STARTED, due again after
   exponential backoff from ``ESCROW_RETRY_DELAY_MS`` capped at 60 s, with the same key;
   never a failure: the money may have moved, and a failure would let the next attempt (a
   new key) move it again.
7. The commands are signed system commands whose ids derive from the effect
   (``payments:instructions:{escrowId}``, ``payments:instructions-failed:{escrowId}``,
   ``payments:settled:{settlementId}`` — which Stripe's ``transfer.created`` webhook uses
   too — and ``payments:failed:{settlementId}``), so a duplicate is applied once; the outbox
   relay sends them.  A crash between steps 5 and 6 leaves the effect STARTED: its lease
   runs out and it is called again with the same key.

The pure decisions of these steps (which effect, still current, held, outcomes, command ids)
are in :mod:`escrow_stream.agents.effect_rules`; this module does the I/O around them.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import timedelta
from typing import Any, Protocol

import faust

from escrow_stream.agents.effect_rules import (
    chargeback_open,
    effect_snapshot,
    is_chargeback_refund,
    is_current,
    nothing_to_move,
    refused,
    result_command_id,
    succeeded,
    wanted_effect,
)
from escrow_stream.agents.leased import LeasedWork
from escrow_stream.agents.relay import OutboxPublisher
from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.db import effects, outbox
from escrow_stream.db.effects import Effect, EffectKind, EffectResult, EffectState
from escrow_stream.db.pool import Database
from escrow_stream.domain import Escrow, SettlementKind, WalletDestination, parse_event
from escrow_stream.domain.event_data import EscrowRefundedData
from escrow_stream.domain.events import Event
from escrow_stream.domain.money import RAIL_PROVIDER
from escrow_stream.messages import make_command
from escrow_stream.metrics import PAYMENT_EFFECTS
from escrow_stream.payments.common import PermanentSettlementError
from escrow_stream.payments.risk import RiskScreener
from escrow_stream.retry import SCHEDULED_FLOOR_S, backoff_s, until_answered

log = logging.getLogger(__name__)

ACTOR = {"id": "payments-agent", "role": "system"}
RETRY_CAP_S = 60.0
POLL_S = 1.0
DATABASE_RETRY_FIRST_S = 0.5
IN_FLIGHT_MAX = 32
#: A leased effect is taken over by another worker only this long after one call round.
LEASE_MARGIN_S = 30.0
#: The error code of a held settlement dropped because its chargeback was lost.
CHARGEBACK_LOST = "chargeback_lost"
#: Snapshot fields no rail reads, left out of the effect's stored event (bounded size).
UNUSED_FIELDS = frozenset({"recentCommands", "ledger"})


class Rail(Protocol):
    """One payment provider, as the agent drives it (the escrow as the event's snapshot)."""

    async def payment_instructions(self, escrow: Escrow) -> dict[str, Any]:
        """The RecordPaymentInstructions payload (plus the Stripe ``clientSecret``, which the
        agent keeps out of it); the same escrow gives the same object.  Raises
        PermanentSettlementError."""
        ...

    async def settle(self, escrow: Escrow) -> dict[str, Any] | None:
        """Perform the pending settlement: the ConfirmSettlement payload, or None when the
        provider reports completion later by webhook.  Raises PermanentSettlementError."""
        ...

    async def cancel_instructions(self, escrow: Escrow, payment_id: str) -> None:
        """Withdraw the payment instructions ``payment_id`` of a cancelled escrow.  Raises
        PermanentSettlementError."""
        ...


class InstructionsUnanswered(Exception):
    """The PaymentIntent to cancel may still be made: its own effect has no answer yet."""


class PaymentEffects:
    """Steps 1-3 (``on_event``) and 4-7 (``run_due``) of the module docstring."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        database: Database,
        rails: dict[str, Rail],
        publisher: OutboxPublisher,
        screener: RiskScreener | None = None,
    ) -> None:
        self._screener = screener
        self._settings = settings
        self._clock = clock
        self._database = database
        self._rails = rails
        self._publisher = publisher
        self._secret = settings.internal_command_secret.get_secret_value()
        self._first_delay_s = settings.escrow_retry_delay_ms / 1000
        rounds = settings.escrow_max_retries + 1
        self._lease = timedelta(
            seconds=rounds * settings.provider_timeout_ms / 1000 + LEASE_MARGIN_S
        )
        self._work = LeasedWork("payment effect", self._claim, self.perform, _key, IN_FLIGHT_MAX)
        self.wake = self._work.wake
        self.run_due = self._work.run_due
        self.drain = self._work.drain
        self.run_forever = self._work.run_forever

    # -- steps 1-3: the stream -----------------------------------------------------------

    async def on_event(self, event: Event, raw: dict[str, Any]) -> bool:
        """Record the effect ``event`` asks for (``raw``: the event as read from the topic,
        which the effect keeps); True when a new one is now due."""
        escrow = event.escrow
        if escrow.rail.value not in self._rails:
            return False
        wanted = wanted_effect(event)
        if wanted is None:
            await self._fail_held_if_chargeback_lost(event)
            return False
        key, kind = wanted
        pool = await self._database.pool()
        stored = await effects.mirrored_escrow(pool, escrow.escrow_id)
        mirrored = None if stored is None else (stored[0], Escrow.model_validate(stored[1]))
        if not is_current(event, key, kind, mirrored):
            log.info(
                "effect %s skipped: the escrow has moved on since event %s", key, event.event_id
            )
            return False
        provider = RAIL_PROVIDER[escrow.rail].value
        kept = {**raw, "escrow": {k: v for k, v in raw["escrow"].items() if k not in UNUSED_FIELDS}}
        topic = self._settings.kafka_commands_topic
        now = self._clock()
        held = kind is EffectKind.SETTLEMENT and chargeback_open(event, mirrored)
        new = await effects.start(
            pool, key, kind, escrow.rail.value, provider, kept, topic, now, held=held
        )
        if not new and kind is EffectKind.SETTLEMENT:  # step 3a: hold, or due again
            new = await effects.set_held(pool, key, held, now)
        due = new and not held
        if due:
            self.wake.set()
        return due

    async def _fail_held_if_chargeback_lost(self, event: Event) -> None:
        """Step 3b: a lost chargeback ended the escrow REFUNDED: the settlement held for it
        is never performed (the card network moved the money; the escrow has nothing pending
        to confirm, so no command is sent)."""
        if not isinstance(event.data, EscrowRefundedData) or not is_chargeback_refund(event):
            return
        pool = await self._database.pool()
        message = f"chargeback {event.data.provider_reference} lost: never sent"
        failed = await effects.fail_held(
            pool, event.escrow_id, CHARGEBACK_LOST, message, self._clock()
        )
        for key in failed:
            PAYMENT_EFFECTS.labels("settlement", "failed").inc()
            log.warning("payment effect %s dropped: %s", key, message)

    # -- steps 4-7: the runner -----------------------------------------------------------

    async def _claim(self, room: int) -> list[Effect]:
        """Step 4: lease the deployment's due effects there is room for."""
        now = self._clock()
        pool = await self._database.pool()
        topic = self._settings.kafka_commands_topic
        return await effects.claim_due(pool, topic, now, now + self._lease, room)

    async def perform(self, effect: Effect) -> None:
        """Steps 5-6 for one leased effect."""
        escrow = effect_snapshot(effect)
        rail = self._rails[effect.rail]
        label = effect.kind.value.lower()
        try:
            if effect.kind is EffectKind.INSTRUCTIONS:
                answer: dict[str, Any] | None = await rail.payment_instructions(escrow)
            elif effect.kind is EffectKind.CANCEL_INSTRUCTIONS:
                answer = await self._cancel_instructions(rail, escrow)
            else:
                await self._screen_buyer_wallet(escrow)
                answer = nothing_to_move(effect, escrow) or await rail.settle(escrow)
        except PermanentSettlementError as exc:
            PAYMENT_EFFECTS.labels(label, "failed").inc()
            log.warning("payment effect %s refused for good: %s %s", effect.key, exc.code, exc)
            await self._finish(effect, refused(effect, exc.code, str(exc)))
            return
        except Exception as exc:  # the outcome is unknown: same key, later
            PAYMENT_EFFECTS.labels(label, "retry").inc()
            now = self._clock()
            wait_s = backoff_s(
                effect.attempts - 1, self._first_delay_s, RETRY_CAP_S, floor_s=SCHEDULED_FLOOR_S
            )
            at = now + timedelta(seconds=wait_s)
            log.warning(
                "payment effect %s (attempt %d) outcome unknown, again at %s: %s",
                effect.key,
                effect.attempts,
                at.isoformat(),
                exc,
            )
            pool = await self._database.pool()
            await effects.retry_later(pool, effect.key, f"{type(exc).__name__}: {exc}", at, now)
            return
        PAYMENT_EFFECTS.labels(label, "succeeded").inc()
        await self._finish(effect, succeeded(effect, answer))

    async def _cancel_instructions(self, rail: Rail, escrow: Escrow) -> dict[str, Any]:
        """Cancel the PaymentIntent the escrow recorded, or the one its instructions effect
        made (the escrow may have been cancelled before it recorded the answer)."""
        payment_id = escrow.payment.provider_payment_id if escrow.payment else None
        if not payment_id:
            pool = await self._database.pool()
            made = await effects.get(pool, effects.instructions_key(escrow.escrow_id))
            if made is not None and made["state"] == EffectState.STARTED.value:
                raise InstructionsUnanswered("the PaymentIntent is still being created")
            if made is None or made["state"] != EffectState.SUCCEEDED.value:
                return {}  # no PaymentIntent was made: nothing to cancel
            payment_id = made["provider_object_id"]
        await rail.cancel_instructions(escrow, str(payment_id))
        return {"providerReference": str(payment_id)}

    async def _screen_buyer_wallet(self, escrow: Escrow) -> None:
        """A USDC refund to the ``buyerWalletAddress`` the buyer gave at create is screened
        like a payout wallet, before any money moves (SPEC §10): flagged → refused for good
        (``destination_flagged``, never paid); no answer from TRM or Chainalysis → the
        outcome waits like any unknown one (fail closed).  A refund to the deposit's sender
        needs nothing more: that address was screened when the deposit arrived."""
        wallet = escrow.buyer_wallet_address
        settlement = escrow.settlement
        if (
            self._screener is None
            or not wallet
            or settlement is None
            or settlement.kind is not SettlementKind.REFUND
            or not isinstance(settlement.destination, WalletDestination)
            or settlement.destination.address != wallet
        ):
            return
        try:
            verdict = await self._screener.screen(wallet, reference=f"refund:{escrow.escrow_id}")
        except ValueError as exc:  # not a 0x address: nothing will ever pay it
            raise PermanentSettlementError("destination_invalid", str(exc)) from exc
        if not verdict.passed:
            raise PermanentSettlementError(
                "destination_flagged",
                f"the buyer's refund wallet failed screening: {'; '.join(verdict.reasons())}",
            )

    async def _finish(self, effect: Effect, outcome: EffectResult) -> None:
        """Step 6: the outcome and its command commit together (step 7: signed, outbox)."""
        now = self._clock()
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            if not await effects.finish(conn, effect.key, outcome, now):
                return  # finished meanwhile by a worker that took over an expired lease
            if outcome.result_type is None or outcome.result_payload is None:
                return
            command = make_command(
                ACTOR,
                outcome.result_type,
                effect.escrow_id,
                outcome.result_payload,
                result_command_id(effect, outcome.state),
                now,
                causation_id=effect.event.get("eventId"),
                correlation_id=effect.event.get("correlationId"),
            )
            await outbox.enqueue_command(conn, effect.commands_topic, command, self._secret)
        self._publisher.notify()


def _key(effect: Effect) -> str:
    return effect.key


def register(app: faust.App, payments: PaymentEffects, events_topic: faust.TopicT) -> None:
    """The agent (steps 1-3) and the runner task (steps 4-7) on ``app``."""

    @app.agent(events_topic, name="payments-effects")
    async def payments_effects(stream: faust.StreamT[bytes]) -> None:
        async for value in stream:
            try:
                raw = json.loads(value)
                event = parse_event(raw)
            except ValueError as exc:  # incl. EventInvalid: one bad record must not stop it
                log.error("payments agent: an event it cannot read was skipped: %s", exc)
                continue
            # the database, shared by every escrow, is down: wait for it
            await until_answered(
                "payments agent: recording the effect",
                functools.partial(payments.on_event, event, raw),
                lambda: bool(app.should_stop),
                first_s=DATABASE_RETRY_FIRST_S,
                cap_s=RETRY_CAP_S,
            )

    @app.task  # type: ignore[untyped-decorator]
    async def payment_effects_runner() -> None:
        await payments.run_forever(lambda: bool(app.should_stop), POLL_S)
