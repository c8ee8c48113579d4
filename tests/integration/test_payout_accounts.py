"""The ``payout_accounts`` repository on the real PostgreSQL: activations, Stripe's word in
any order, the processor's lookup, and resumes claimed once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from escrow_stream.config import Settings
from escrow_stream.db import payouts
from escrow_stream.db.payouts import AwaitingRelease, PayoutDirectory, PayoutStatus
from escrow_stream.db.pool import Database, create_pool
from escrow_stream.domain import Rail, StripeAccountDestination, WalletDestination
from tests.harness import unique

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
WALLET = "0x" + "a1" * 20


@pytest.fixture
async def pool(stack_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(stack_settings)
    try:
        yield pool
    finally:
        await pool.close()


async def test_activation_time_names_each_activation(pool: asyncpg.Pool) -> None:
    user = unique("seller")
    pending = await payouts.put(pool, user, Rail.USDC_BASE, WALLET, PayoutStatus.PENDING, T0, "t")
    assert (pending.status, pending.activated_at) == (PayoutStatus.PENDING, None)

    active = await payouts.put(pool, user, Rail.USDC_BASE, WALLET, PayoutStatus.ACTIVE, T0, "t")
    assert active.activated_at == T0
    later = T0 + timedelta(hours=1)
    again = await payouts.put(pool, user, Rail.USDC_BASE, WALLET, PayoutStatus.ACTIVE, later, "t")
    assert again.activated_at == T0  # the same activation: nothing new to resume
    other = "0x" + "b2" * 20
    moved = await payouts.put(pool, user, Rail.USDC_BASE, other, PayoutStatus.ACTIVE, later, "t")
    assert (moved.destination, moved.activated_at) == (other, later)  # a new destination
    off = await payouts.put(pool, user, Rail.USDC_BASE, other, PayoutStatus.REJECTED, later, "t")
    assert off.activated_at is None
    assert [a.rail for a in await payouts.of_user(pool, user)] == [Rail.USDC_BASE]


async def test_stripe_says_active_or_not_and_an_older_word_loses(pool: asyncpg.Pool) -> None:
    user, account_id = unique("seller"), f"acct_{unique('x').replace('-', '')}"
    created = await payouts.add_if_absent(pool, user, Rail.STRIPE, account_id, T0, user)
    assert created.status is PayoutStatus.PENDING
    again = await payouts.add_if_absent(pool, user, Rail.STRIPE, "acct_other", T0, user)
    assert again.destination == account_id  # one account per user and rail

    async with pool.acquire() as conn:
        on = await payouts.set_stripe_payouts(conn, account_id, True, T0, T0)
        assert [a.status for a in on] == [PayoutStatus.ACTIVE]
        stale = await payouts.set_stripe_payouts(conn, account_id, False, T0 - timedelta(1), T0)
        assert stale == []
        repeat = await payouts.set_stripe_payouts(conn, account_id, True, T0, T0)
        assert repeat == []  # no change: nothing to resume again
        off = await payouts.set_stripe_payouts(conn, account_id, False, T0 + timedelta(1), T0)
        assert [a.status for a in off] == [PayoutStatus.PENDING]


async def test_the_processor_sees_only_an_active_account(
    pool: asyncpg.Pool, stack_settings: Settings
) -> None:
    user = unique("seller")
    database = Database(stack_settings)
    try:
        directory = PayoutDirectory(database)
        assert await directory.active(user, Rail.STRIPE) is None
        await payouts.put(pool, user, Rail.STRIPE, "acct_9", PayoutStatus.PENDING, T0, "t")
        assert await directory.active(user, Rail.STRIPE) is None
        await payouts.put(pool, user, Rail.STRIPE, "acct_9", PayoutStatus.ACTIVE, T0, "t")
        await payouts.put(pool, user, Rail.USDC_BASE, WALLET, PayoutStatus.ACTIVE, T0, "t")
        assert await directory.active(user, Rail.STRIPE) == StripeAccountDestination(
            account_id="acct_9"
        )
        assert await directory.active(user, Rail.USDC_BASE) == WalletDestination(address=WALLET)
    finally:
        await database.close()


async def test_a_resume_is_claimed_once(pool: asyncpg.Pool) -> None:
    release = AwaitingRelease(
        escrow_id=unique("esc"),
        settlement_id="escrow-release:x:all:1",
        seller_id=unique("seller"),
        destination="acct_9",
        activated_at=T0,
    )
    command_id = unique("payout-resume")
    async with pool.acquire() as conn:
        assert await payouts.claim_resume(conn, command_id, release, T0)
        assert not await payouts.claim_resume(conn, command_id, release, T0)
