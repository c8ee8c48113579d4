"""HTTP benchmark on loopback: ``POST /api/escrow`` (202 path) and ``GET /api/escrow/{id}``,
each as a ratio to ``GET /health`` measured in the same run, and the round trip of a
``POST /api/escrow`` with ``Prefer: wait=5`` (201 once the worker has processed it).

Run with the local stack up (``make run`` or ``make stack-up``)::

    .venv/bin/python -m benchmarks.http [--requests 2000] [--concurrency 32] [--wait-requests 500]

One worker process serves (KYC gating on: the benchmark migrates the database and verifies
its buyer and seller through ``PUT /api/kyc/{user}`` first); the load generator is aiohttp
with ``--concurrency`` clients, ``--requests`` requests per endpoint, in this process.
``Prefer: wait=5`` is measured twice: one client at a time (the round trip: HTTP, the
outbox, Kafka, the processor, the answer) and ``--concurrency`` clients.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, TCPConnector

from benchmarks.common import (
    CpuSample,
    Stopwatch,
    Table,
    bench_env,
    cleanup,
    command_line,
    cpu_note,
    ms,
    prepare,
    quantile,
    stack_pids,
    verify_kyc,
)
from escrow_stream.web.auth import Role, issue_token
from tests.harness import Stack

SELLER = "bench-seller"


async def load(
    url: str,
    method: str,
    count: int,
    concurrency: int,
    headers: dict[str, str],
    body: Any = None,
    expect: int = 200,
) -> tuple[float, list[float]]:
    """Requests per second and per-request latencies (s)."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def client(session: ClientSession) -> None:
        while not queue.empty():
            queue.get_nowait()
            started = time.perf_counter()
            async with session.request(method, url, json=body, headers=headers) as response:
                await response.read()
                assert response.status == expect, (response.status, await response.text())
            latencies.append(time.perf_counter() - started)

    async with ClientSession(connector=TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return count / elapsed, latencies


def row(
    table: Table, name: str, rate: float, latencies: list[float], baseline: float | None
) -> None:
    table.add(
        name,
        f"{rate:,.0f}",
        ms(quantile(latencies, 50)),
        ms(quantile(latencies, 99)),
        f"{rate / baseline:.3f}" if baseline else "",
    )


async def run_load(
    port: int,
    stack: Stack,
    args: argparse.Namespace,
    buyer: str,
    table: Table,
    pids: dict[str, int],
) -> list[str]:
    """The table's rows; and a note for each endpoint measured against /health: the CPU
    each part used while it was loaded."""
    base = f"http://127.0.0.1:{port}"
    count, concurrency = args.requests, args.concurrency
    secret = stack.settings.jwt_secret.get_secret_value()
    bearer = {
        "Authorization": "Bearer "
        + issue_token(secret, buyer, Role.USER, datetime.now(UTC), timedelta(hours=1))
    }
    body = {
        "offerId": "o",
        "contractId": "c",
        "rail": "STRIPE",
        "amount": "10000",
        "currency": "USD",
        "sellerId": SELLER,
    }
    # one escrow to read, created and waited for
    async with (
        ClientSession() as session,
        session.post(
            f"{base}/api/escrow", json=body, headers={**bearer, "Prefer": "wait=30"}
        ) as response,
    ):
        assert response.status == 201, await response.text()
        escrow_id = (await response.json())["escrowId"]

    cpu: list[str] = []

    async def measured(what: str, loading: Any) -> tuple[float, list[float]]:
        before = CpuSample.take(pids)
        result: tuple[float, list[float]] = await loading
        cpu.append(cpu_note(what, before.shares(CpuSample.take(pids))))
        return result

    health = await measured("GET /health", load(f"{base}/health", "GET", count, concurrency, {}))
    post = await measured(
        "POST /api/escrow (202)",
        load(f"{base}/api/escrow", "POST", count, concurrency, bearer, body, 202),
    )
    get = await measured(
        "GET /api/escrow/{id}",
        load(f"{base}/api/escrow/{escrow_id}", "GET", count, concurrency, bearer),
    )
    waiting = {**bearer, "Prefer": "wait=5"}
    url = f"{base}/api/escrow"
    wait_one = await load(url, "POST", args.wait_requests, 1, waiting, body, 201)
    wait_many = await load(url, "POST", args.wait_requests, concurrency, waiting, body, 201)
    row(table, "GET /health", *health, health[0])
    row(table, "POST /api/escrow (202)", *post, health[0])
    row(table, "GET /api/escrow/{id}", *get, health[0])
    row(table, "POST /api/escrow, Prefer: wait=5 (201), 1 client", *wait_one, None)
    row(table, f"POST /api/escrow, Prefer: wait=5 (201), {concurrency} clients", *wait_many, None)
    return cpu


def run(argv: Sequence[str] | None = None) -> Table:
    parser = argparse.ArgumentParser(prog="benchmarks.http", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--wait-requests", type=int, default=500)
    args = parser.parse_args(argv)
    clock = Stopwatch()
    table = Table(
        "HTTP, one worker, loopback",
        command_line("benchmarks.http", list(argv or [])),
        columns=("endpoint", "req/s", "p50", "p99", "ratio to /health"),
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    stack = Stack.create(tmp, **bench_env())
    try:
        prepare(stack)
        worker = stack.worker("bench").start()
        worker.wait_healthy()
        worker.wait_processing()
        buyer = f"bench-{uuid.uuid4().hex[:6]}"
        verify_kyc(stack, worker, [buyer, SELLER])
        cpu = asyncio.run(run_load(worker.port, stack, args, buyer, table, stack_pids(worker)))
        assert worker.stop() == 0, worker.log_tail()
    finally:
        cleanup(stack)
        shutil.rmtree(tmp, ignore_errors=True)
    table.notes = [
        f"{args.requests:,} requests per endpoint with {args.concurrency} concurrent clients; "
        f"{args.wait_requests:,} requests for each Prefer: wait=5 row.",
        "The load generator runs on the same cores as the worker, the broker and the databases.",
        *cpu,
    ]
    table.seconds = clock.seconds
    return table


def main() -> None:
    print(run(sys.argv[1:]).markdown())


if __name__ == "__main__":
    main()
