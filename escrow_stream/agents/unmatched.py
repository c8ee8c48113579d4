"""Unmatched funds: money that arrived and that no escrow took is returned or held, never lost.

Where it comes from (SPEC §10):

* a **rejected ConfirmFunds** on ``escrow.rejections.v1`` (its record carries the payment it
  reported): a PaymentIntent that succeeded after its escrow was cancelled, a second
  payment, a USDC deposit that is short, too large or a second one.  The escrow's refusal is
  final — an escrow in AWAIT_FUNDS takes only one payment of exactly its amount — so the
  money is recorded RETURNING (reason: the rejection code).  Not money: refusals of a
  command we cannot trust (NOT_AUTHORIZED, COMMAND_ID_REUSED).  NOT_FOUND, an escrow id this
  deployment does not know (another deployment's, on a shared provider account?), is
  recorded NEEDS_REVIEW and never returned without a person;
* a **flagged USDC deposit** (``agents.deposit_screening``): recorded FROZEN there, never moved.

The return runner, a task in every worker (woken by a new row, else every ``POLL_S``), leases
due RETURNING rows of this deployment (``FOR UPDATE SKIP LOCKED``), up to ``IN_FLIGHT_MAX``:

1. **Stripe**: a full Refund of the PaymentIntent, idempotency key ``unmatched:{fundsId}``
   (so a retry, a redelivered rejection or a second worker gets the same Refund).
   ``succeeded`` → RETURNED; ``pending`` / ``requires_action`` → the Refund is read again
   after backoff (and ``charge.refunded`` / ``refund.updated`` confirm it sooner);
   ``failed`` / ``canceled`` or a permanent refusal (already refunded, disputed, …) →
   NEEDS_REVIEW with Stripe's words.
2. **Custodian**: a transfer of the deposit's amount back to its sender (the address screened
   when the deposit arrived), reference ``unmatched:{fundsId}``; RETURNED on its
   ``transfer.completed`` webhook, NEEDS_REVIEW on ``transfer.failed`` or a 4xx refusal.
3. No answer (5xx, timeout) → due again after exponential backoff from
   ``ESCROW_RETRY_DELAY_MS`` (capped at 60 s), same key: the money may have moved.

Amounts sent back are the provider's own (the whole PaymentIntent; the deposit as the
custodian's signed webhook reported it), never a figure from a Kafka message.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import timedelta
from typing import Any, Protocol

import faust

from escrow_stream.agents.leased import LeasedWork
from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.db import unmatched
from escrow_stream.db.deposits import DepositStatus
from escrow_stream.db.pool import Database
from escrow_stream.db.unmatched import FundsStatus, UnmatchedFunds
from escrow_stream.domain import RejectionCode
from escrow_stream.payments.common import PermanentSettlementError
from escrow_stream.payments.custodian import CustodianClient, CustodianRefused
from escrow_stream.payments.stripe_rail import REFUND_DONE, REFUND_UNDER_WAY
from escrow_stream.retry import SCHEDULED_FLOOR_S, backoff_s, until_answered

log = logging.getLogger(__name__)

POLL_S = 1.0
RETRY_CAP_S = 60.0
IN_FLIGHT_MAX = 16
LEASE_S = 120.0
#: Refusals that say nothing about money: the command itself was not to be trusted.
NOT_MONEY = frozenset({RejectionCode.NOT_AUTHORIZED, RejectionCode.COMMAND_ID_REUSED})


class StripeRefunds(Protocol):
    async def refund_payment(
        self, payment_intent_id: str, key: str, metadata: dict[str, str]
    ) -> tuple[str, str]: ...

    async def refund_status(self, refund_id: str) -> str: ...


def refused_payment(
    rejection: dict[str, Any],
) -> tuple[dict[str, Any], RejectionCode, FundsStatus] | None:
    """(payment, code, status to record) when ``rejection`` refused money: a ConfirmFunds
    carrying its payment, refused for a reason about the money.  NOT_FOUND goes to review."""
    payment = rejection.get("payment")
    if rejection.get("type") != "ConfirmFunds" or not isinstance(payment, dict):
        return None
    try:
        code = RejectionCode(str(rejection.get("code")))
    except ValueError:
        return None
    if code in NOT_MONEY:
        return None
    status = FundsStatus.NEEDS_REVIEW if code is RejectionCode.NOT_FOUND else FundsStatus.RETURNING
    return payment, code, status


class UnmatchedReturns:
    """Records rejected payments (``on_rejection``) and sends them back (``run_due``)."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        database: Database,
        stripe: StripeRefunds | None,
        custodian: CustodianClient | None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._database = database
        self._stripe = stripe
        self._custodian = custodian
        self._first_delay_s = settings.escrow_retry_delay_ms / 1000
        self._work = LeasedWork(
            "unmatched funds", self._claim, self.perform, _funds_id, IN_FLIGHT_MAX
        )
        self.wake = self._work.wake
        self.run_due = self._work.run_due
        self.drain = self._work.drain
        self.run_forever = self._work.run_forever

    # -- recording -----------------------------------------------------------------------

    async def on_rejection(self, rejection: dict[str, Any]) -> bool:
        """Record the money a rejected ConfirmFunds reported; True when it is new."""
        refused = refused_payment(rejection)
        if refused is None:
            return False
        payment, code, status = refused
        provider = str(payment["provider"])
        object_id = str(payment["providerPaymentId"])
        escrow_id = rejection.get("escrowId")
        pool = await self._database.pool()
        if provider == "custodian":
            funds = await self._deposit_funds(pool, object_id, escrow_id, code, status)
        else:
            funds = UnmatchedFunds(
                funds_id=unmatched.funds_id_for(provider, object_id),
                provider=provider,
                provider_object_id=object_id,
                escrow_id=escrow_id,
                commands_topic=self._settings.kafka_commands_topic,
                amount=int(payment["amount"]),
                currency=str(payment["currency"]),
                reason=code.value,
                detail=rejection.get("message"),
                status=status,
            )
        if funds is None:
            return False
        new = await unmatched.record(pool, funds, self._clock())
        if new:
            log.warning(
                "unmatched funds %s (%s %s, escrow %s): %s, %s",
                funds.funds_id,
                funds.amount,
                funds.currency,
                funds.escrow_id,
                funds.reason,
                funds.status.value,
            )
            self.wake.set()
        return new

    async def _deposit_funds(
        self,
        pool: Any,
        deposit_id: str,
        escrow_id: str | None,
        code: RejectionCode,
        status: FundsStatus,
    ) -> UnmatchedFunds | None:
        """A refused deposit as the custodian's signed webhook reported it (our record)."""
        row = await pool.fetchrow(
            "SELECT * FROM custodian_deposits WHERE deposit_id = $1", deposit_id
        )
        if row is None or row["status"] != DepositStatus.CLEARED.value:
            log.error("rejected deposit %s is not a cleared deposit we recorded", deposit_id)
            return None
        return UnmatchedFunds(
            funds_id=unmatched.funds_id_for("custodian", deposit_id),
            provider="custodian",
            provider_object_id=deposit_id,
            escrow_id=escrow_id or row["escrow_id"],
            commands_topic=self._settings.kafka_commands_topic,
            amount=int(row["amount"]),
            currency=str(row["asset"]),
            reason=code.value,
            status=status,
            sender_address=row["sender_address"],
        )

    # -- returning -----------------------------------------------------------------------

    async def _claim(self, room: int) -> list[UnmatchedFunds]:
        now = self._clock()
        pool = await self._database.pool()
        topic = self._settings.kafka_commands_topic
        return await unmatched.claim_due(pool, topic, now, now + timedelta(seconds=LEASE_S), room)

    async def perform(self, funds: UnmatchedFunds) -> None:
        pool = await self._database.pool()
        try:
            if funds.provider == "stripe":
                await self._refund(pool, funds)
            else:
                await self._transfer_back(pool, funds)
        except PermanentSettlementError as exc:
            log.error("return of unmatched funds %s refused: %s", funds.funds_id, exc)
            error = f"{exc.code}: {exc}"
            await unmatched.settle(
                pool, funds.funds_id, FundsStatus.NEEDS_REVIEW, self._clock(), error=error
            )
        except Exception as exc:  # no answer: the same key, later
            now = self._clock()
            at = now + self._retry_delay(funds)
            log.warning(
                "return of unmatched funds %s: no answer (%s), again later", funds.funds_id, exc
            )
            await unmatched.retry_later(
                pool, funds.funds_id, f"{type(exc).__name__}: {exc}", at, now
            )

    def _retry_delay(self, funds: UnmatchedFunds) -> timedelta:
        """How long a return without an answer (or still under way) waits for its next try."""
        wait_s = backoff_s(
            funds.attempts - 1, self._first_delay_s, RETRY_CAP_S, floor_s=SCHEDULED_FLOOR_S
        )
        return timedelta(seconds=wait_s)

    async def _refund(self, pool: Any, funds: UnmatchedFunds) -> None:
        if self._stripe is None:
            raise RuntimeError("no Stripe client in this worker")
        if funds.return_reference is None:
            reference, status = await self._stripe.refund_payment(
                funds.provider_object_id,
                unmatched.return_key(funds.funds_id),
                {"unmatched_funds_id": funds.funds_id, "escrow_id": funds.escrow_id or ""},
            )
        else:
            reference = funds.return_reference
            status = await self._stripe.refund_status(reference)
        now = self._clock()
        if status in REFUND_DONE:
            await unmatched.settle(
                pool, funds.funds_id, FundsStatus.RETURNED, now, reference=reference
            )
        elif status in REFUND_UNDER_WAY:
            at = now + self._retry_delay(funds)
            await unmatched.return_sent(pool, funds.funds_id, reference, at, now)
        else:
            raise PermanentSettlementError(f"refund_{status}", f"Refund {reference} is {status}")

    async def _transfer_back(self, pool: Any, funds: UnmatchedFunds) -> None:
        if self._custodian is None:
            raise RuntimeError("no custodian client in this worker")
        if not funds.sender_address:
            raise PermanentSettlementError("no_sender", "the deposit names no sender address")
        try:
            answer = await self._custodian.create_transfer(
                unmatched.return_key(funds.funds_id),
                funds.amount,
                funds.sender_address,
                {"unmatched_funds_id": funds.funds_id, "escrow_id": funds.escrow_id or ""},
            )
        except CustodianRefused as exc:
            raise PermanentSettlementError(exc.code, str(exc)) from exc
        if str(answer.get("status", "")).upper() == "FAILED":
            raise PermanentSettlementError("transfer_failed", f"transfer {answer['id']} failed")
        # RETURNED when its transfer.completed arrives (web/webhooks.py)
        await unmatched.return_sent(pool, funds.funds_id, str(answer["id"]), None, self._clock())


def _funds_id(funds: UnmatchedFunds) -> str:
    return funds.funds_id


async def confirm_return(
    database: Database,
    clock: Clock,
    provider: str,
    reference: str,
    done: bool,
    error: str = "",
    object_id: str | None = None,
) -> str | None:
    """A provider's word on a return (webhook), found by our return key or the provider's
    object id (``reference``): RETURNED when ``done``, else NEEDS_REVIEW; ``object_id`` is
    the provider's object (it may arrive before the runner recorded it).  The funds id it
    concerned, or None when it was no return of ours."""
    pool = await database.pool()
    funds_id = await unmatched.by_return_reference(pool, provider, reference)
    if funds_id is None:
        return None
    status = FundsStatus.RETURNED if done else FundsStatus.NEEDS_REVIEW
    await unmatched.settle(
        pool, funds_id, status, clock(), reference=object_id, error=error or None
    )
    return funds_id


def register(app: faust.App, returns: UnmatchedReturns, rejections_topic: faust.TopicT) -> None:
    """The agent on the rejections topic and the return runner on ``app``."""

    @app.agent(rejections_topic, name="unmatched-funds")
    async def unmatched_funds(stream: faust.StreamT[bytes]) -> None:
        async for value in stream:
            try:
                rejection = json.loads(value)
            except ValueError:
                log.error("unmatched-funds agent: a rejection that is not JSON was skipped")
                continue
            if not isinstance(rejection, dict):
                continue
            await until_answered(
                "unmatched-funds agent: recording",
                functools.partial(returns.on_rejection, rejection),
                lambda: bool(app.should_stop),
                first_s=0.5,
                cap_s=RETRY_CAP_S,
            )

    @app.task  # type: ignore[untyped-decorator]
    async def unmatched_funds_runner() -> None:
        await returns.run_forever(lambda: bool(app.should_stop), POLL_S)
