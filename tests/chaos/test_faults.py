"""The fault figures (``make test-chaos``): each fault lands while commands stream in, then
``tests/chaos/checks.py`` checks that nothing was lost, nothing applied twice, the mirror
equals the table and every ledger balances; each test prints its counts.

1. SIGKILL 10 times during ~11,000 commands over 1,000 escrows, two workers, one killed at a time.
2. The broker stopped for 15 s mid-stream.
3. PostgreSQL stopped mid-stream: the gateway answers 503 problem+json (never 500) while it
   is away, the mirror catches up afterwards, commands accepted before are not lost.
4. Redis stopped: rate limits fail open, ``Idempotency-Key`` falls back to the database,
   no 5xx.

The stack's own servers are stopped and started with ``scripts/stack.sh``; a server that
script did not start (a system PostgreSQL, say) is not ours to stop, and that test skips.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from escrow_stream.config import Settings, domain_settings
from tests.chaos.checks import check, collect, produce_slowly
from tests.chaos.scenario import SELLER, Expected, escrow_script, expected_outcomes, interleave
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, token
from tests.harness import (
    Stack,
    WorkerProcess,
    activate_payouts,
    require_ours,
    stack_sh,
    stopped,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(1800)]

SESSION_TIMEOUT_MS = "10000"


def scenario(stack: Stack, escrows: int, seed: int) -> tuple[list[dict[str, Any]], Expected]:
    asyncio.run(stack.create_topics())
    asyncio.run(activate_payouts(stack.settings, SELLER["id"]))
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:6]
    scripts = [escrow_script(f"fault-{run}-{i:04d}", rng) for i in range(escrows)]
    commands = interleave(scripts)
    return commands, expected_outcomes(commands, domain_settings(stack.settings))


def two_workers(stack: Stack) -> list[WorkerProcess]:
    workers = [stack.worker(name).start() for name in ("w1", "w2")]
    for worker in workers:
        worker.wait_healthy()
    return workers


def keep_running(workers: list[WorkerProcess]) -> None:
    """What an orchestrator does: start again a worker that exited, and wait for it."""
    for worker in workers:
        if worker.proc is None or worker.proc.poll() is not None:
            worker.start()
        worker.wait_healthy()


def stop_cleanly(workers: list[WorkerProcess]) -> None:
    codes = {w.name: w.stop() for w in workers}
    assert set(codes.values()) == {0}, {w.name: w.log_tail() for w in workers}


def report(name: str, counts: dict[str, int], **extra: object) -> None:
    print(f"\nfault[{name}]: {counts | extra}")


def test_sigkill_ten_times_two_workers_thousand_escrows(
    tmp_path: Path, stack_settings: Settings
) -> None:
    kills = 10
    stack = Stack.create(tmp_path, KAFKA_SESSION_TIMEOUT_MS=SESSION_TIMEOUT_MS)
    commands, expected = scenario(stack, 1000, seed=20261130)
    assert len(commands) >= 10_000
    workers = two_workers(stack)
    started = time.monotonic()
    try:

        async def faults() -> None:
            producing = asyncio.create_task(produce_slowly(stack, commands, 250, 0.5))
            for n in range(kills):
                await asyncio.sleep(3.0)
                victim = workers[n % 2]
                victim.kill()
                victim.start()
                await asyncio.to_thread(victim.wait_healthy)
            await producing

        asyncio.run(faults())
        outcome = asyncio.run(collect(stack, expected))
    finally:
        stop_cleanly(workers)
    counts = check(commands, expected, outcome)
    report("sigkill", counts, kills=kills, seconds=round(time.monotonic() - started))


def test_broker_stopped_for_fifteen_seconds(tmp_path: Path, stack_settings: Settings) -> None:
    require_ours("kafka")
    stack = Stack.create(tmp_path, KAFKA_SESSION_TIMEOUT_MS=SESSION_TIMEOUT_MS)
    commands, expected = scenario(stack, 200, seed=20261131)
    half = len(commands) // 2
    workers = two_workers(stack)
    restarted = 0
    try:
        asyncio.run(produce_slowly(stack, commands[:half], 100, 0.2))
        with stopped("kafka"):
            time.sleep(15)
        restarted = sum(w.proc is not None and w.proc.poll() is not None for w in workers)
        keep_running(workers)
        asyncio.run(produce_slowly(stack, commands[half:], 100, 0.2))
        outcome = asyncio.run(collect(stack, expected))
    finally:
        stack_sh("up", "kafka")
        stop_cleanly(workers)
    counts = check(commands, expected, outcome)
    report("broker-15s", counts, workers_restarted=restarted)


def test_postgres_restarted_mid_stream(tmp_path: Path, stack_settings: Settings) -> None:
    require_ours("postgres")
    stack = Stack.create(tmp_path, KAFKA_SESSION_TIMEOUT_MS=SESSION_TIMEOUT_MS)
    commands, expected = scenario(stack, 200, seed=20261201)
    half = len(commands) // 2
    workers = two_workers(stack)
    buyer = f"pg-{uuid.uuid4().hex[:8]}"
    bearer = token(stack, buyer)
    answers: list[tuple[str, int, str]] = []
    try:
        accepted = []
        for i in range(3):  # accepted over HTTP before the outage: must not be lost
            status, _, body = call(workers[0], "POST", "/api/escrow", bearer, create_body(f"s{i}"))
            assert status == 202, body
            accepted.append(body["escrowId"])
        asyncio.run(produce_slowly(stack, commands[:half], 100, 0.2))
        with stopped("postgres"):
            for i in range(10):
                for method, path, body in (
                    ("POST", "/api/escrow", create_body(f"down-{i}")),
                    ("GET", "/api/escrow", None),
                    ("GET", "/ready", None),
                ):
                    status, headers, _ = call(workers[i % 2], method, path, bearer, body)
                    content_type = headers.get("Content-Type", "")
                    answers.append((f"{method} {path}", status, content_type))
                time.sleep(0.5)
        keep_running(workers)
        asyncio.run(produce_slowly(stack, commands[half:], 100, 0.2))
        outcome = asyncio.run(collect(stack, expected))
        created = asyncio.run(stack.events(lambda es: {e["escrowId"] for e in es} >= set(accepted)))
    finally:
        stack_sh("up", "postgres")
        stop_cleanly(workers)
    assert not [a for a in answers if a[1] >= 500 and a[1] != 503], answers
    writes = [a for a in answers if a[0] == "POST /api/escrow"]
    assert {(s, t.split(";")[0]) for _, s, t in writes} == {(503, "application/problem+json")}
    assert {s for p, s, _ in answers if p == "GET /ready"} == {503}
    assert {e["escrowId"] for e in created} >= set(accepted)
    # the scenario's checks, on the scenario's escrows (the HTTP ones were checked above)
    only_scenario = replace(
        outcome,
        events=[e for e in outcome.events if e["escrowId"] not in accepted],
        table={k: v for k, v in outcome.table.items() if k not in accepted},
        mirrored={k: v for k, v in outcome.mirrored.items() if k not in accepted},
    )
    counts = check(commands, expected, only_scenario)
    report("postgres-restart", counts, http_answers_while_down=len(answers))


def test_redis_stopped(tmp_path: Path, stack_settings: Settings) -> None:
    require_ours("redis")
    stack = Stack.create(
        tmp_path,
        IDEMPOTENCY_STORAGE="redis",
        RATE_LIMIT_PER_USER_PER_MINUTE="5",  # low, to show it fails open while Redis is away
    )
    asyncio.run(stack.create_topics())
    worker = stack.worker("api").start()
    buyer = f"redis-{uuid.uuid4().hex[:8]}"
    bearer = token(stack, buyer)
    try:
        worker.wait_healthy()
        with stopped("redis"):
            answers = []
            for i in range(10):  # twice the per-user limit: not one 429 while Redis is away
                key = {"Idempotency-Key": f"order-{i}"}
                answers.append(
                    call(worker, "POST", "/api/escrow", bearer, create_body(f"s{i}"), key)
                )
            first = {"Idempotency-Key": "order-0"}
            replay = call(worker, "POST", "/api/escrow", bearer, create_body("s0"), first)
            reused = call(worker, "POST", "/api/escrow", bearer, create_body("s9"), first)
            ready = call(worker, "GET", "/ready")
        after = call(worker, "POST", "/api/escrow", bearer, create_body("after"))
    finally:
        stack_sh("up", "redis")
        code = worker.stop()
    assert code == 0, worker.log_tail()
    assert [a[0] for a in answers] == [202] * 10, answers
    assert replay[0] == 202 and replay[1].get("Idempotent-Replayed") == "true"
    assert replay[2] == answers[0][2]  # the same answer, kept by the database store
    assert (reused[0], reused[2]["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert ready[0] == 503 and ready[2]["checks"]["redis"] == "unavailable"
    assert after[0] == 202
    print(f"\nfault[redis-stopped]: {len(answers)} keyed POSTs accepted, replay from the database")
