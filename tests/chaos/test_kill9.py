"""Fault test: SIGKILL the worker repeatedly while 1,000+ commands stream in.

Afterwards every command has exactly the outcome the domain gives it, no escrow went
through a transition the seed forbids, versions are contiguous, the table equals the last
events' snapshots, and every ledger balances (``tests/chaos/checks.py``).  The short fault
test that every ``make test`` runs; the longer ones are ``make test-chaos``.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from pathlib import Path

import pytest

from escrow_stream.config import Settings, domain_settings
from tests.chaos.checks import check, collect, produce_slowly
from tests.chaos.scenario import SELLER, escrow_script, expected_outcomes, interleave
from tests.harness import Stack, WorkerProcess, activate_payouts, default_guarantee

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ESCROWS = 100
KILLS = 3
SEED = 20261128
CHUNK = 40
CHUNK_PAUSE_S = 0.4


async def kill_and_restart(worker: WorkerProcess, kills: int) -> int:
    """SIGKILL the worker ``kills`` times, each while it is processing, then restart it."""
    done = 0
    for n in range(kills):
        # kill early once (during recovery), otherwise after it has worked a while
        await asyncio.sleep(1.0 if n == 1 else 3.0)
        worker.kill()
        done += 1
        worker.start()
        await asyncio.to_thread(worker.wait_healthy)
    return done


def test_sigkill_during_a_command_stream(tmp_path: Path, stack_settings: Settings) -> None:
    guarantee = os.environ.get("CHAOS_PROCESSING_GUARANTEE") or default_guarantee()
    stack = Stack.create(
        tmp_path, KAFKA_SESSION_TIMEOUT_MS="10000", KAFKA_PROCESSING_GUARANTEE=guarantee
    )
    asyncio.run(stack.create_topics())
    asyncio.run(activate_payouts(stack.settings, SELLER["id"]))
    rng = random.Random(SEED)
    run = uuid.uuid4().hex[:6]
    scripts = [escrow_script(f"chaos-{run}-{i:03d}", rng) for i in range(ESCROWS)]
    commands = interleave(scripts)
    assert len(commands) >= 1000
    expected = expected_outcomes(commands, domain_settings(stack.settings))

    worker = stack.worker("w1").start()
    try:
        worker.wait_healthy()

        async def scenario() -> int:
            producing = asyncio.create_task(produce_slowly(stack, commands, CHUNK, CHUNK_PAUSE_S))
            kills = await kill_and_restart(worker, KILLS)
            await producing
            return kills

        kills = asyncio.run(scenario())
        outcome = asyncio.run(collect(stack, expected))
    finally:
        code = worker.stop()
    assert code == 0, worker.log_tail()
    assert kills >= KILLS
    counts = check(commands, expected, outcome)
    print(f"\nchaos ({guarantee}): {KILLS} SIGKILLs, read_committed: {counts}")
    if guarantee == "exactly_once":  # a killed worker's transactions were aborted, not seen
        assert counts["event_duplicates_from_faults"] == 0, counts
        assert counts["rejection_duplicates_from_faults"] == 0, counts
