"""Migrations: up creates the seed's tables and indexes, down removes them, up again works."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from escrow_stream.config import Settings
from escrow_stream.db import migrate
from tests.harness import drop_database, unique

pytestmark = pytest.mark.integration

SEED_TABLES = {
    "escrows",
    "escrow_events",
    "outbox",
    "command_idempotency",
    "stripe_escrows",
    "stablecoin_escrows",
    "milestone_escrows",
    "deliveries",
    "disputes",
    "audit_logs",
    "ledger_entries",
    "kyc_status",
}
SEED_INDEXED_COLUMNS = {
    ("escrows", "offer_id"),
    ("escrows", "contract_id"),
    ("escrows", "status"),
    ("escrows", "rail"),
    ("escrows", "expires_at"),
    ("escrows", "auto_refund_at"),
    ("escrow_events", "escrow_id"),
}


@pytest.fixture
async def scratch_db(stack_settings: Settings) -> AsyncIterator[str]:
    """A database of its own, so dropping tables never disturbs other tests."""
    admin_url = stack_settings.database_url.get_secret_value()
    name = unique("migrations").replace("-", "_")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await drop_database(conn, name)
        await conn.close()


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


async def _columns(url: str, table: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1", table
        )
        return {r["column_name"] for r in rows}
    finally:
        await conn.close()


async def _indexes(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        )
    finally:
        await conn.close()


PAYOUT_TABLES = {"payout_accounts", "payout_resumes"}


async def test_up_down_up(stack_settings: Settings, scratch_db: str) -> None:
    await asyncio.to_thread(migrate.upgrade, stack_settings, database_url=scratch_db)
    assert await _tables(scratch_db) >= SEED_TABLES | {"custodian_deposits"} | PAYOUT_TABLES
    status = await asyncio.to_thread(migrate.status, stack_settings, database_url=scratch_db)
    assert "current: 0006 (head)" in status

    indexes = await _indexes(scratch_db)
    single_column = {
        (r["tablename"], r["indexdef"].rsplit("(", 1)[1].rstrip(")").split(",")[0].strip())
        for r in indexes
        if "WHERE" not in r["indexdef"]
    }
    assert single_column >= SEED_INDEXED_COLUMNS
    partial = [
        r["indexdef"] for r in indexes if r["tablename"] == "outbox" and "WHERE" in r["indexdef"]
    ]
    assert len(partial) == 1 and "published_at IS NULL" in partial[0]

    assert "unmatched_funds" in await _tables(scratch_db)
    await asyncio.to_thread(migrate.downgrade_to, stack_settings, "0004", database_url=scratch_db)
    assert "unmatched_funds" not in await _tables(scratch_db)  # 0005 down: its table and columns
    assert await _columns(scratch_db, "payment_effects") >= {"effect_key", "event"}
    assert "held" not in await _columns(scratch_db, "payment_effects")
    await asyncio.to_thread(migrate.downgrade_to, stack_settings, "0003", database_url=scratch_db)
    assert "payment_effects" not in await _tables(scratch_db)  # 0004 down: only its table
    assert await _tables(scratch_db) >= PAYOUT_TABLES
    await asyncio.to_thread(migrate.downgrade_to, stack_settings, "0002", database_url=scratch_db)
    assert (await _tables(scratch_db)) & PAYOUT_TABLES == set()
    assert "escrows_awaiting_payout_idx" not in {r["indexname"] for r in await _indexes(scratch_db)}
    assert "custodian_deposits" in await _tables(scratch_db)
    await asyncio.to_thread(migrate.downgrade, stack_settings, 1, database_url=scratch_db)
    assert "custodian_deposits" not in await _tables(scratch_db)
    assert await _tables(scratch_db) >= SEED_TABLES  # one step down leaves 0001 whole

    await asyncio.to_thread(migrate.downgrade_to, stack_settings, "base", database_url=scratch_db)
    assert (await _tables(scratch_db)) & SEED_TABLES == set()

    await asyncio.to_thread(migrate.upgrade, stack_settings, database_url=scratch_db)
    assert await _tables(scratch_db) >= SEED_TABLES | {"custodian_deposits"} | PAYOUT_TABLES
