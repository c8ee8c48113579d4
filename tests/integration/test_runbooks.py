"""Runbook: resetting the worker group's offsets reprocesses commands without double effects."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from escrow_stream.config import Settings
from escrow_stream.runbooks import read_table_from_changelog
from tests.chaos.scenario import escrow_script
from tests.harness import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ESCROWS = 10


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [sys.executable, "-m", "escrow_stream.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_offset_reset_reprocesses_without_double_effects(
    tmp_path: Path, stack_settings: Settings
) -> None:
    stack = Stack.create(tmp_path, KAFKA_SESSION_TIMEOUT_MS="10000")
    asyncio.run(stack.create_topics())
    run = uuid.uuid4().hex[:6]
    rng = random.Random(3)
    commands = [c for i in range(ESCROWS) for c in escrow_script(f"reset-{run}-{i}", rng)]
    group = stack.settings.kafka_group_id

    worker = stack.worker("w1").start()
    worker.wait_healthy()
    asyncio.run(stack.send(commands))
    caused = {c["commandId"] for c in commands}

    def outcomes_seen(events: list[dict[str, object]]) -> int:
        return sum(e["type"] in ("EscrowReleased", "EscrowRefunded") for e in events)

    before = asyncio.run(stack.events(lambda es: outcomes_seen(es) >= ESCROWS))
    before_table = asyncio.run(read_table_from_changelog(stack.settings, group))
    rejections_before = asyncio.run(stack.rejections(lambda rs: False, timeout_s=2))

    # 1. with the worker running, the reset refuses
    refused = cli(stack, "offsets", "reset", "--to-earliest", "--execute")
    assert refused.returncode != 0
    assert "stop every worker first" in refused.stderr

    # 2. stop, dry run, execute
    assert worker.stop() == 0, worker.log_tail()
    dry = cli(stack, "offsets", "reset", "--to-earliest")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout
    assert "-> 0" in dry.stdout
    done = cli(stack, "offsets", "reset", "--to-earliest", "--execute")
    assert done.returncode == 0, done.stderr
    assert f"offsets of group {group}" in done.stdout

    # 3. restart: every command is read again
    worker.start()
    worker.wait_healthy()
    rejected_before = len(rejections_before)
    after_rejections = asyncio.run(
        stack.rejections(lambda rs: len(rs) >= 2 * rejected_before, timeout_s=120)
    )
    after = asyncio.run(stack.events(lambda es: False, timeout_s=3))
    after_table = asyncio.run(read_table_from_changelog(stack.settings, group))
    assert worker.stop() == 0, worker.log_tail()

    # the replay re-emitted recorded outcomes only: same events, same rejections, same state
    assert len(after_rejections) == 2 * rejected_before
    first = {r["commandId"]: r["code"] for r in rejections_before}
    assert all(first[r["commandId"]] == r["code"] for r in after_rejections)
    assert len(after) > len(before)  # duplicates of recorded events were sent again...
    assert {e["eventId"] for e in after} == {e["eventId"] for e in before}  # ...and nothing new
    assert {e["causationId"] for e in after} <= caused
    assert after_table == before_table
    print(
        f"\nreset: {len(commands)} commands replayed; events {len(before)} -> {len(after)} "
        f"records, {len({e['eventId'] for e in after})} distinct; "
        f"state of {len(after_table)} escrows unchanged: {json.dumps(after_table == before_table)}"
    )
