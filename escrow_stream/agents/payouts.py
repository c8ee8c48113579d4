"""Payout accounts at work: onboarding, wallet screening, and resuming releases on activation.

Setting an account (the seller's own endpoints, an admin's or service's PUT, Stripe's
``account.updated``), in order:

1. Ask the provider outside any transaction: Stripe for the Connect account, or TRM Labs
   and Chainalysis for a wallet (both must pass; an error or a missing answer is never a
   pass: the wallet stays PENDING and is screened again later, fail closed).
2. In one PostgreSQL transaction: store the account and, when it is ACTIVE, enqueue through
   the outbox a signed ``ResumeSettlement`` for every release of that seller the mirror
   shows AWAITING_PAYOUT_ACCOUNT on that rail.
3. Wake the outbox relay: the escrows settle within seconds, without an operator.

Every ``INTERVAL_S`` (2 s), on every worker (:func:`register`), the same sweep runs for
every seller, because the mirror trails the tables: a release that started waiting just before
its seller's account became ACTIVE is found by a later sweep.  The sweep resumes only
escrows the worker's own ``escrows`` table holds still waiting (a database shared by
several deployments, as in tests, never has one deployment resume another's escrows).
Each ResumeSettlement has a commandId derived from the escrow, the settlement, the
destination and the activation, and is claimed once in ``payout_resumes`` before it is
enqueued, so any number of sweeps and workers send it once; the escrow dedupes it too.  The
same tick screens again the wallets whose screening is due, and refreshes the
awaiting-releases gauge.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import faust
from faust.types import TableT

from escrow_stream.agents.relay import OutboxPublisher
from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.db import outbox, payouts
from escrow_stream.db.payouts import AwaitingRelease, PayoutAccount, PayoutStatus
from escrow_stream.db.pool import Database
from escrow_stream.domain import Rail, SettlementStatus
from escrow_stream.messages import make_command
from escrow_stream.metrics import SETTLEMENTS_AWAITING_PAYOUT
from escrow_stream.payments.risk import RiskScreener, ScreeningUnavailable
from escrow_stream.payments.stripe_connect import AccountNotFound, StripeConnect
from escrow_stream.retry import SCHEDULED_FLOOR_S, backoff_s
from escrow_stream.tables import escrows as escrow_table

log = logging.getLogger(__name__)

ACTOR = {"id": "payout-accounts", "role": "system"}
INTERVAL_S = 2.0
SCREEN_BATCH_MAX = 20
RESUME_BATCH_MAX = 100
#: A wallet left PENDING by a screening error is screened again after a backoff from
#: ``ESCROW_RETRY_DELAY_MS`` that never waits longer than this.
SCREEN_RETRY_CAP_S = 300.0


@dataclass(frozen=True)
class WalletVerdict:
    """Step 1 for a wallet: the status it gets, the screening record, or the error."""

    status: PayoutStatus
    record: dict[str, Any] | None
    error: str | None = None


def resume_command_id(release: AwaitingRelease) -> str:
    """One commandId per (escrow, settlement, destination, activation)."""
    basis = "\n".join(
        (
            release.escrow_id,
            release.settlement_id,
            release.destination,
            release.activated_at.isoformat(),
        )
    )
    return f"payout-resume:{hashlib.sha256(basis.encode()).hexdigest()[:40]}"


class PayoutService:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        database: Database,
        screener: RiskScreener,
        connect: StripeConnect,
        publisher: OutboxPublisher,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._database = database
        self._screener = screener
        self._connect = connect
        self._publisher = publisher
        self._secret = settings.internal_command_secret.get_secret_value()
        self._first_retry_s = settings.escrow_retry_delay_ms / 1000

    # -- reads ----------------------------------------------------------------------

    async def accounts(self, user_id: str) -> list[PayoutAccount]:
        pool = await self._database.pool()
        return await payouts.of_user(pool, user_id)

    # -- Stripe ---------------------------------------------------------------------

    async def onboard_stripe(self, user_id: str) -> tuple[PayoutAccount, str]:
        """The seller's Connect account (created once) and a fresh onboarding link."""
        pool = await self._database.pool()
        account = await payouts.get(pool, user_id, Rail.STRIPE)
        if account is None:
            account_id = await self._connect.create_express_account(user_id)
            account = await payouts.add_if_absent(
                pool, user_id, Rail.STRIPE, account_id, self._clock(), user_id
            )
        return account, await self._connect.onboarding_url(account.destination)

    async def set_stripe(self, user_id: str, account_id: str, updated_by: str) -> PayoutAccount:
        """An account a marketplace onboarded elsewhere: ACTIVE only if Stripe pays out."""
        enabled = await self._connect.payouts_enabled(account_id)
        if enabled is None:
            raise AccountNotFound(f"Stripe has no account {account_id}")
        status = PayoutStatus.ACTIVE if enabled else PayoutStatus.PENDING
        return await self._store(user_id, Rail.STRIPE, account_id, status, updated_by)

    async def stripe_account_updated(
        self, account_id: str, payouts_enabled: bool, event_at: datetime
    ) -> list[PayoutAccount]:
        """``account.updated``: ACTIVE when payouts are enabled (resuming what waited),
        back to PENDING when they are not."""
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            changed = await payouts.set_stripe_payouts(
                conn, account_id, payouts_enabled, event_at, self._clock()
            )
            for account in changed:
                if account.status is PayoutStatus.ACTIVE:
                    await self._enqueue_resumes(conn, account.user_id)
        self._publisher.notify()
        return changed

    # -- wallets --------------------------------------------------------------------

    async def screen_wallet(self, address: str, reference: str) -> WalletVerdict:
        """Step 1 for a wallet: clean → ACTIVE, flagged → REJECTED, no answer → PENDING."""
        try:
            verdict = await self._screener.screen(address, reference=reference)
        except (ScreeningUnavailable, ValueError) as exc:
            return WalletVerdict(PayoutStatus.PENDING, None, str(exc))
        record: dict[str, Any] = {
            "passed": verdict.passed,
            "reasons": verdict.reasons(),
            "providers": [
                {"provider": p.provider, "passed": p.passed, "risk": p.risk, "raw": p.raw}
                for p in verdict.providers
            ],
        }
        status = PayoutStatus.ACTIVE if verdict.passed else PayoutStatus.REJECTED
        return WalletVerdict(status, record)

    async def set_wallet(self, user_id: str, address: str, updated_by: str) -> PayoutAccount:
        """Steps 1-3 for a wallet."""
        verdict = await self.screen_wallet(address, reference=f"payout:{user_id}")
        return await self._store(
            user_id, Rail.USDC_BASE, address, verdict.status, updated_by, verdict
        )

    async def reject(
        self, user_id: str, rail: Rail, destination: str, updated_by: str
    ) -> PayoutAccount:
        """An admin blocks an account: it is never paid."""
        return await self._store(user_id, rail, destination, PayoutStatus.REJECTED, updated_by)

    def _screen_retry_delay(self, attempt: int) -> timedelta:
        """How long a wallet left PENDING waits before it is screened again."""
        wait_s = backoff_s(
            attempt, self._first_retry_s, SCREEN_RETRY_CAP_S, floor_s=SCHEDULED_FLOOR_S
        )
        return timedelta(seconds=wait_s)

    async def _store(
        self,
        user_id: str,
        rail: Rail,
        destination: str,
        status: PayoutStatus,
        updated_by: str,
        verdict: WalletVerdict | None = None,
    ) -> PayoutAccount:
        """Steps 2-3."""
        now = self._clock()
        retry_at = None
        if verdict is not None and verdict.status is PayoutStatus.PENDING:
            retry_at = now + self._screen_retry_delay(0)
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            account = await payouts.put(
                conn,
                user_id,
                rail,
                destination,
                status,
                now,
                updated_by,
                screening=verdict.record if verdict else None,
                next_screening_at=retry_at,
                last_error=verdict.error if verdict else None,
            )
            if account.status is PayoutStatus.ACTIVE:
                await self._enqueue_resumes(conn, user_id)
        self._publisher.notify()
        return account

    # -- the sweep ------------------------------------------------------------------

    async def tick(self, holds: Callable[[str], bool] | None = None) -> None:
        """Screen the wallets that are due, resume what waits (among the escrows for which
        ``holds`` is true), refresh the gauge."""
        screened = 0
        while screened < SCREEN_BATCH_MAX and await self._screen_one_due():
            screened += 1
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            resumed = await self._enqueue_resumes(conn, None, holds)
        if screened or resumed:
            self._publisher.notify()
        SETTLEMENTS_AWAITING_PAYOUT.set(await payouts.count_awaiting(pool))

    async def _screen_one_due(self) -> bool:
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            now = self._clock()
            row = await payouts.claim_due_screening(conn, now)
            if row is None:
                return False
            user_id, address = row["user_id"], row["destination"]
            verdict = await self.screen_wallet(address, reference=f"payout:{user_id}")
            if verdict.status is PayoutStatus.PENDING:
                at = self._clock() + self._screen_retry_delay(row["attempts"] + 1)
                log.warning("screening of payout wallet of %s deferred: %s", user_id, verdict.error)
                await payouts.screening_failed(conn, user_id, verdict.error or "", at, now)
                return True
            account = await payouts.put(
                conn,
                user_id,
                Rail.USDC_BASE,
                address,
                verdict.status,
                now,
                row["updated_by"],
                screening=verdict.record,
            )
            if account.status is PayoutStatus.ACTIVE:
                await self._enqueue_resumes(conn, user_id)
            return True

    async def _enqueue_resumes(
        self,
        conn: asyncpg.Connection,
        seller_id: str | None,
        holds: Callable[[str], bool] | None = None,
    ) -> int:
        """Step 2's ResumeSettlement commands, each claimed once, in the caller's
        transaction; how many were enqueued."""
        now = self._clock()
        enqueued = 0
        for release in await payouts.awaiting_releases(conn, seller_id, RESUME_BATCH_MAX):
            if holds is not None and not holds(release.escrow_id):
                continue
            command_id = resume_command_id(release)
            if not await payouts.claim_resume(conn, command_id, release, now):
                continue
            command = make_command(
                ACTOR,
                "ResumeSettlement",
                release.escrow_id,
                {"settlementId": release.settlement_id},
                command_id,
                now,
            )
            await outbox.enqueue_command(
                conn, self._settings.kafka_commands_topic, command, self._secret
            )
            enqueued += 1
        if enqueued:
            log.info("resumed %d release(s) waiting for a payout account", enqueued)
        return enqueued


def register(app: faust.App, service: PayoutService, escrows: TableT[str, Any]) -> None:
    def holds(escrow_id: str) -> bool:
        """This worker's table has the escrow, its release still waiting."""
        escrow = escrow_table.load(escrows.get(escrow_id))
        settlement = escrow.settlement if escrow is not None else None
        return (
            settlement is not None and settlement.status is SettlementStatus.AWAITING_PAYOUT_ACCOUNT
        )

    @app.timer(INTERVAL_S, name="payout-accounts")  # type: ignore[untyped-decorator]
    async def payout_accounts() -> None:
        try:
            await service.tick(holds)
        except Exception:  # the database is down, say: the next tick tries again
            log.exception("payout-account sweep failed; retrying next tick")
