"""Fault test: SIGKILL the worker repeatedly while 1,000+ commands stream in.

Afterwards every command has exactly the outcome the domain gives it, no escrow went
through a transition the seed forbids, versions are contiguous, the table equals the last
events' snapshots, and every ledger balances.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from escrow_stream.agents.processor import domain_settings
from escrow_stream.commands import read_table_from_changelog
from escrow_stream.config import Settings
from escrow_stream.db.pool import create_pool
from escrow_stream.db.queries import reconcile
from escrow_stream.domain import Escrow, check_invariants, is_allowed_transition
from tests.chaos.scenario import escrow_script, expected_outcomes, interleave
from tests.harness import Stack, WorkerProcess, mirrored_snapshots

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ESCROWS = 100
KILLS = 3
SEED = 20261128
CHUNK = 40
CHUNK_PAUSE_S = 0.4
SETTLE_WAIT_S = 240.0


async def produce_slowly(stack: Stack, commands: list[dict[str, Any]]) -> None:
    for i in range(0, len(commands), CHUNK):
        await stack.send(commands[i : i + CHUNK])
        await asyncio.sleep(CHUNK_PAUSE_S)


async def kill_and_restart(stack: Stack, worker: WorkerProcess, kills: int) -> int:
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


async def read_until_complete(
    stack: Stack, expected_events: set[str], expected_rejections: set[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    deadline = time.monotonic() + SETTLE_WAIT_S
    events: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = [
            json.loads(r.value)
            for r in await stack.read(
                stack.settings.kafka_events_topic,
                lambda rs: False,
                timeout_s=2,
                isolation_level="read_committed",
            )
        ]
        rejections = await stack.rejections(lambda rs: False, timeout_s=1)
        if expected_events <= {e["eventId"] for e in events} and expected_rejections <= {
            r["commandId"] for r in rejections
        }:
            break
        await asyncio.sleep(2)
    return events, rejections


async def wait_for_mirror(stack: Stack, table: dict[str, Any]) -> dict[str, Any]:
    """The mirror's snapshots, once it has caught up with the table (bounded wait)."""
    deadline = time.monotonic() + SETTLE_WAIT_S
    mirrored: dict[str, Any] = {}
    while time.monotonic() < deadline:
        mirrored = await mirrored_snapshots(stack.settings, list(table))
        if mirrored == table:
            break
        await asyncio.sleep(1)
    return mirrored


async def reconcile_mirror(stack: Stack, escrow_ids: list[str]) -> list[str]:
    pool = await create_pool(stack.settings)
    try:
        return await reconcile(pool, escrow_ids)
    finally:
        await pool.close()


def test_sigkill_during_a_command_stream(tmp_path: Path, stack_settings: Settings) -> None:
    guarantee = os.environ.get("CHAOS_PROCESSING_GUARANTEE", "at_least_once")
    stack = Stack.create(
        tmp_path, KAFKA_SESSION_TIMEOUT_MS="10000", KAFKA_PROCESSING_GUARANTEE=guarantee
    )
    asyncio.run(stack.create_topics())
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
            producing = asyncio.create_task(produce_slowly(stack, commands))
            kills = await kill_and_restart(stack, worker, KILLS)
            await producing
            return kills

        kills = asyncio.run(scenario())
        events, rejections = asyncio.run(
            read_until_complete(stack, set(expected.event_ids), set(expected.rejections))
        )
        table = asyncio.run(
            read_table_from_changelog(stack.settings, stack.settings.kafka_group_id)
        )
        mirrored = asyncio.run(wait_for_mirror(stack, table))
    finally:
        code = worker.stop()
    assert code == 0, worker.log_tail()
    assert kills >= KILLS

    # 1. exactly the expected events, each with its expected identity
    distinct = {e["eventId"]: e for e in events}
    duplicates = len(events) - len(distinct)
    print(
        f"\nchaos ({guarantee}): {len(commands)} commands over {ESCROWS} escrows, "
        f"{kills} SIGKILLs; "
        f"{len(events)} event records read_committed, {len(distinct)} distinct, "
        f"{duplicates} duplicates; {len(rejections)} rejection records, "
        f"{len({r['commandId'] for r in rejections})} distinct"
    )
    assert set(distinct) == set(expected.event_ids)
    for event_id, event in distinct.items():
        assert (
            event["escrowId"],
            event["version"],
            event["type"],
            event["causationId"],
        ) == expected.event_ids[event_id]
    for event in events:  # a redelivered copy is the same event (same id, same data)
        assert event["data"] == distinct[event["eventId"]]["data"]

    # 2. every command has exactly one kind of outcome
    rejected = defaultdict(set)
    for r in rejections:
        rejected[r["commandId"]].add(r["code"])
    assert {c: codes for c, codes in rejected.items()} == {
        c: {code} for c, code in expected.rejections.items()
    }
    caused = {e["causationId"] for e in distinct.values()}
    assert not caused & set(rejected)
    assert not (caused | set(rejected)) & expected.no_ops
    all_ids = {c["commandId"] for c in commands}
    assert all_ids == caused | set(rejected) | expected.no_ops

    # 3./4. contiguous versions and only the seed's transitions, per escrow
    by_escrow: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in distinct.values():
        by_escrow[event["escrowId"]].append(event)
    for escrow_id, history in by_escrow.items():
        history.sort(key=lambda e: e["version"])
        assert [e["version"] for e in history] == list(range(1, len(history) + 1)), escrow_id
        statuses = [e["escrow"]["status"] for e in history]
        for before, after in itertools.pairwise(statuses):
            assert before == after or is_allowed_transition(before, after), (escrow_id, statuses)

    # 5. the table equals the newest snapshot, matches the replay, and every ledger balances
    assert set(table) == set(expected.final)
    for escrow_id, value in table.items():
        assert value == by_escrow[escrow_id][-1]["escrow"]
        escrow = Escrow.model_validate(value)
        assert escrow.status == expected.final[escrow_id].status
        assert escrow.version == expected.final[escrow_id].version
        assert check_invariants(escrow) == []
    print(f"chaos: final statuses {dict(Counter(v['status'] for v in table.values()))}")

    # 6. the PostgreSQL mirror equals the table, and its ledger reconciles
    assert mirrored == table
    problems = asyncio.run(reconcile_mirror(stack, list(table)))
    assert problems == []
