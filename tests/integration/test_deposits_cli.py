"""`escrow-stream deposits list`: the compliance reviewer's view of custodian deposits."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import asyncpg
from click.testing import CliRunner

from escrow_stream.cli import main
from escrow_stream.config import Settings
from escrow_stream.db import deposits
from escrow_stream.db.deposits import Deposit, DepositStatus
from tests.harness import stack_environ

TOPIC = "deposits-cli.commands"
SENDER = "0x" + "12" * 20


async def _seed(settings: Settings, escrow_id: str) -> None:
    now = datetime.now(UTC)
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        for n, status in enumerate([DepositStatus.CLEARED, DepositStatus.FROZEN]):
            deposit = Deposit(
                deposit_id=f"dpt-{escrow_id}-{n}",
                escrow_id=escrow_id,
                deposit_address="0x" + "34" * 20,
                sender_address=SENDER,
                tx_hash=None,
                amount=25_000_000,
                asset="USDC",
                confirmations=12,
            )
            assert await deposits.record(conn, deposit, TOPIC, now) is True
            assert await deposits.record(conn, deposit, TOPIC, now) is False  # once per deposit
            await conn.execute(
                "UPDATE custodian_deposits SET status = $2 WHERE deposit_id = $1",
                deposit.deposit_id,
                status.value,
            )
    finally:
        await conn.close()


def test_frozen_deposits_are_listed_for_review(stack_settings: Settings) -> None:
    escrow_id = f"dep-cli-{uuid.uuid4().hex[:8]}"
    asyncio.run(_seed(stack_settings, escrow_id))
    env = stack_environ()
    result = CliRunner().invoke(
        main, ["deposits", "list", "--status", "FROZEN", "--escrow-id", escrow_id], env=env
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(d["deposit_id"], d["status"]) for d in lines] == [(f"dpt-{escrow_id}-1", "FROZEN")]
    assert lines[0]["amount"] == 25_000_000 and lines[0]["sender_address"] == SENDER

    every = CliRunner().invoke(main, ["deposits", "list", "--escrow-id", escrow_id], env=env)
    assert [json.loads(line)["status"] for line in every.stdout.splitlines()] == [
        "CLEARED",
        "FROZEN",
    ]
    refused = CliRunner().invoke(main, ["deposits", "list", "--status", "LOST"], env=env)
    assert refused.exit_code == 2 and "LOST" in refused.output
