"""Deposit screening: no USDC counts as held before TRM Labs and Chainalysis cleared its sender.

Every second, on every worker, for each deposit due (``custodian_deposits``, status
SCREENING), one at a time, inside one PostgreSQL transaction that holds the row locked
(``FOR UPDATE SKIP LOCKED``: workers never screen the same deposit at once):

1. Screen the sender address with both providers.
2. Both passed → enqueue ConfirmFunds (commandId ``custodian:deposit:{depositId}``) through
   the outbox; the deposit is CLEARED.  The escrow's own rules then check the amount and
   currency (AMOUNT_MISMATCH otherwise: a partial deposit never holds funds).
3. A provider flagged the sender → the deposit is FROZEN for compliance review, never sent
   back automatically, and recorded in ``unmatched_funds`` as FROZEN (``SENDER_FLAGGED``);
   CancelEscrow with reason COMPLIANCE_REJECTED naming the deposit and its amount is
   enqueued (``custodian:compliance:{depositId}``): the escrow cancels only when that
   deposit is the one that would fund it (exactly its amount, while AWAIT_FUNDS), so a
   flagged "dust" deposit freezes itself and nothing else (SPEC §10).
4. A provider error → the deposit stays SCREENING, with the error and the next attempt time
   (exponential backoff from ``ESCROW_RETRY_DELAY_MS``, capped at 5 minutes); nothing else.

The command and the deposit's new status commit together, so a crash anywhere leaves the
deposit either unscreened (screened again) or decided with its command on the way.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import faust

from escrow_stream.agents.relay import OutboxPublisher
from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.db import deposits, outbox, unmatched
from escrow_stream.db.deposits import DepositStatus
from escrow_stream.db.pool import Database
from escrow_stream.db.unmatched import FundsStatus, UnmatchedFunds
from escrow_stream.domain import Command
from escrow_stream.messages import make_command
from escrow_stream.payments.risk import RiskScreener, ScreeningUnavailable, Verdict
from escrow_stream.retry import SCHEDULED_FLOOR_S, backoff_s

log = logging.getLogger(__name__)

ACTOR = {"id": "deposit-screening", "role": "system"}
INTERVAL_S = 1.0
BATCH = 20
#: Step 4's backoff, from ``ESCROW_RETRY_DELAY_MS``, never waits longer than this.
RETRY_CAP_S = 300.0


class DepositScreening:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        database: Database,
        screener: RiskScreener,
        publisher: OutboxPublisher,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._database = database
        self._screener = screener
        self._publisher = publisher
        self._secret = settings.internal_command_secret.get_secret_value()

    async def screen_due(self, limit: int = BATCH) -> int:
        """Screen up to ``limit`` due deposits; how many were decided or rescheduled."""
        done = 0
        while done < limit and await self._screen_one():
            done += 1
        if done:
            self._publisher.notify()
        return done

    async def _screen_one(self) -> bool:
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            now = self._clock()
            row = await deposits.claim_due(conn, self._settings.kafka_commands_topic, now)
            if row is None:
                return False
            try:
                verdict = await self._screener.screen(
                    row["sender_address"], reference=row["escrow_id"]
                )
            except (ScreeningUnavailable, ValueError) as exc:  # step 4
                first_s = self._settings.escrow_retry_delay_ms / 1000
                wait_s = backoff_s(row["attempts"], first_s, RETRY_CAP_S, floor_s=SCHEDULED_FLOOR_S)
                at = self._clock() + timedelta(seconds=wait_s)
                log.warning("screening of deposit %s deferred: %s", row["deposit_id"], exc)
                await deposits.retry_later(conn, row["deposit_id"], str(exc), at)
                return True
            record = screening_record(verdict)
            if verdict.passed:  # step 2
                command, status = confirm_funds(row, now), DepositStatus.CLEARED
            else:  # step 3
                command, status = compliance_cancel(row, now), DepositStatus.FROZEN
                await unmatched.record(conn, frozen_funds(self._settings, row), now, record)
                log.warning(
                    "deposit %s of escrow %s FROZEN for compliance review: %s",
                    row["deposit_id"],
                    row["escrow_id"],
                    "; ".join(verdict.reasons()),
                )
            await outbox.enqueue_command(
                conn, self._settings.kafka_commands_topic, command, self._secret
            )
            await deposits.record_screening(conn, row["deposit_id"], status, record, now)
            return True


def screening_record(verdict: Verdict) -> dict[str, Any]:
    """What the deposit keeps of its screening (the compliance record)."""
    return {
        "passed": verdict.passed,
        "reasons": verdict.reasons(),
        "providers": [
            {"provider": p.provider, "passed": p.passed, "risk": p.risk, "raw": p.raw}
            for p in verdict.providers
        ],
    }


def confirm_funds(row: Any, now: datetime) -> Command:
    """Step 2: the cleared deposit reported to its escrow, which checks amount and currency."""
    payload = {
        "provider": "custodian",
        "providerPaymentId": row["deposit_id"],
        "amount": str(row["amount"]),
        "currency": row["asset"],
        "senderAddress": row["sender_address"],
    }
    command_id = f"custodian:deposit:{row['deposit_id']}"
    return make_command(ACTOR, "ConfirmFunds", row["escrow_id"], payload, command_id, now)


def compliance_cancel(row: Any, now: datetime) -> Command:
    """Step 3: cancel the escrow, if this flagged deposit is the one that would fund it."""
    payload = {
        "reason": "COMPLIANCE_REJECTED",
        "providerPaymentId": row["deposit_id"],
        "amount": str(row["amount"]),
        "currency": row["asset"],
    }
    command_id = f"custodian:compliance:{row['deposit_id']}"
    return make_command(ACTOR, "CancelEscrow", row["escrow_id"], payload, command_id, now)


def frozen_funds(settings: Settings, row: Any) -> UnmatchedFunds:
    """A flagged deposit as unmatched funds: FROZEN, listed for compliance, never moved."""
    return UnmatchedFunds(
        funds_id=unmatched.funds_id_for("custodian", row["deposit_id"]),
        provider="custodian",
        provider_object_id=row["deposit_id"],
        escrow_id=row["escrow_id"],
        commands_topic=settings.kafka_commands_topic,
        amount=int(row["amount"]),
        currency=row["asset"],
        reason=unmatched.SENDER_FLAGGED,
        status=FundsStatus.FROZEN,
        sender_address=row["sender_address"],
    )


def register(app: faust.App, screening: DepositScreening) -> None:
    @app.timer(INTERVAL_S, name="deposit-screening")  # type: ignore[untyped-decorator]
    async def screen_deposits() -> None:
        try:
            await screening.screen_due()
        except Exception:  # the database is down, say: the next tick tries again
            log.exception("deposit screening failed; retrying next tick")
