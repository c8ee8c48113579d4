"""The timeout processor's deadline index in real workers: the processor's writes feed it, a
worker's ticks read none of its escrows while none is due, and after a rebalance each worker
rebuilds it from exactly the partitions it actively owns (the changelog restore of a new
worker bypasses the processor; its standby copies of the other's partitions are not its own).

What the ticks did is read from the workers' debug log lines (``agents/timeouts.py``):
``timeout tick: <due> due, <read> escrow(s) read, <indexed> indexed`` and ``deadline index
rebuilt for (<generation>, frozenset({<partitions>})) from <read> escrow(s), ...``.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from escrow_stream.config import Settings
from tests.harness import Stack, WorkerProcess
from tests.integration.test_processing import create

# Over four minutes (the timeout interval cannot be under one minute, and the test waits for
# ticks on two workers): with the long fault tests in `make test-chaos`, not `make test`.
pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(900)]

T = TypeVar("T")

ESCROWS = 240
#: The timer's shortest interval (``ESCROW_TIMEOUT_POLL_INTERVAL_MINUTES`` is whole minutes).
TICK_S = 60
#: Start-up, a rebalance and two ticks, with room for a loaded machine.
TICKS_WAIT_S = 4 * TICK_S + 60

TICK = re.compile(r"timeout tick: (\d+) due, (\d+) escrow\(s\) read, (\d+) indexed")
REBUILT = re.compile(
    r"deadline index rebuilt for \((\d+), frozenset\(\{?([\d, ]*)\}?\)\) from (\d+) escrow\(s\)"
)


def ticks(worker: WorkerProcess, since: int = 0) -> list[tuple[int, int, int]]:
    """(due, read, indexed) of each tick the worker logged after byte `since` of its log."""
    return [tuple(map(int, m.groups())) for m in TICK.finditer(_log(worker, since))]  # type: ignore[misc]


def rebuilds(worker: WorkerProcess, since: int = 0) -> list[tuple[int, frozenset[int], int]]:
    """(generation, partitions, escrows read) of each rebuild logged after byte `since`."""
    return [
        (int(g), frozenset(int(p) for p in ps.split(",") if p.strip()), int(n))
        for g, ps, n in REBUILT.findall(_log(worker, since))
    ]


def _log(worker: WorkerProcess, since: int) -> str:
    return worker.log_path.read_bytes()[since:].decode(errors="replace")


def log_size(worker: WorkerProcess) -> int:
    return worker.log_path.stat().st_size


def wait_for(what: str, answer: Callable[[], T | None], workers: list[WorkerProcess]) -> T:
    """Poll `answer` until it is not None, while the workers live (bounded)."""
    deadline = time.monotonic() + TICKS_WAIT_S
    while time.monotonic() < deadline:
        for worker in workers:
            assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
        found = answer()
        if found is not None:
            return found
        time.sleep(1)
    tails = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
    raise AssertionError(f"no {what} within {TICKS_WAIT_S}s\n{tails}")


def test_ticks_read_no_escrow_and_each_worker_indexes_only_its_active_partitions(
    tmp_path: Path, stack_settings: Settings
) -> None:
    stack = Stack.create(tmp_path, ESCROW_TIMEOUT_POLL_INTERVAL_MINUTES="1", LOG_LEVEL="debug")
    asyncio.run(stack.create_topics())
    w1 = stack.worker("w1").start()
    try:
        w1.wait_processing()
        # 1. the first tick builds the index from the (empty) table
        wait_for("first rebuild", lambda: rebuilds(w1) or None, [w1])
        # 2. escrows created through Kafka: the processor's writes index them
        ids = [f"esc-{uuid.uuid4().hex[:12]}" for _ in range(ESCROWS)]
        asyncio.run(stack.send([create(e) for e in ids]))
        created = asyncio.run(
            stack.events(lambda es: {x["escrowId"] for x in es} >= set(ids), timeout_s=120)
        )
        assert {x["escrowId"] for x in created} >= set(ids)
        mark = log_size(w1)
        # 3. the next tick: every escrow indexed (expiry in 7 days), none due, none read
        due, read, _ = wait_for(
            "tick with every escrow indexed",
            lambda: next((t for t in ticks(w1, mark) if t[2] == ESCROWS), None),
            [w1],
        )
        assert (due, read) == (0, 0)
        assert rebuilds(w1, mark) == []  # the processor's hook did it, not a rebuild

        # 4. a second worker with an empty DATA_DIR: a rebalance; its table comes from the
        #    changelog, and each worker rebuilds its index for the partitions it now owns
        marks = {"w1": log_size(w1), "w2": 0}
        w2 = stack.worker("w2").start()
        try:
            workers = [w1, w2]

            def settled() -> tuple[list[tuple[int, int, int]], ...] | None:
                """Each worker's ticks since its last rebuild, once the two rebuilds are of
                the same generation and the ticks after them are there."""
                last = [rebuilds(w, marks[w.name]) for w in workers]
                if not all(last) or last[0][-1][0] != last[1][-1][0]:
                    return None
                after = []
                for w in workers:
                    text = _log(w, marks[w.name])
                    tail = text[[m.start() for m in REBUILT.finditer(text)][-1] :]
                    after.append([tuple(map(int, m.groups())) for m in TICK.finditer(tail)])
                return tuple(after) if all(len(a) >= 2 for a in after) else None  # type: ignore[misc]

            after = wait_for("both workers rebuilt and ticking", settled, workers)
            (_, parts1, read1), (_, parts2, read2) = (
                rebuilds(w1, marks["w1"])[-1],
                rebuilds(w2, marks["w2"])[-1],
            )
            assert parts1 and parts2 and not parts1 & parts2
            assert parts1 | parts2 == set(range(6))
            # each read its own active partitions' escrows: together all, neither all
            assert read1 + read2 == ESCROWS and 0 < read1 < ESCROWS
            for worker_ticks, owned in zip(after, (read1, read2), strict=True):
                # the tick of the rebuild and the next one: nothing due, nothing read
                assert all(t == (0, 0, owned) for t in worker_ticks), worker_ticks
            assert w2.stop() == 0, w2.log_tail()
        finally:
            w2.stop()
    finally:
        stopped = w1.stop()
    assert stopped == 0, w1.log_tail()
