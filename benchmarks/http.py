"""HTTP benchmark on loopback: ``POST /api/escrow`` (202 path) and ``GET /api/escrow/{id}``,
each as a ratio to ``GET /health`` measured in the same run.

Run with the local stack up (``make stack-up``): ``python -m benchmarks.http``.
One worker process serves; the load generator is aiohttp with ``--concurrency`` clients,
``--requests`` requests per endpoint, in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, TCPConnector

from escrow_stream.web.auth import Role, issue_token
from tests.harness import Stack


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


def row(name: str, rate: float, latencies: list[float], baseline: float) -> str:
    q = statistics.quantiles(latencies, n=100)
    return (
        f"{name:<28} {rate:>9,.0f} req/s  p50 {q[49] * 1000:6.1f} ms  "
        f"p99 {q[98] * 1000:6.1f} ms  ratio to /health {rate / baseline:.3f}"
    )


async def run(port: int, stack: Stack, count: int, concurrency: int) -> None:
    base = f"http://127.0.0.1:{port}"
    secret = stack.settings.jwt_secret.get_secret_value()
    buyer = f"bench-{uuid.uuid4().hex[:6]}"
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
        "sellerId": "bench-seller",
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

    health = await load(f"{base}/health", "GET", count, concurrency, {})
    post = await load(f"{base}/api/escrow", "POST", count, concurrency, bearer, body, 202)
    get = await load(f"{base}/api/escrow/{escrow_id}", "GET", count, concurrency, bearer)
    print(f"{count} requests per endpoint, {concurrency} concurrent clients, one worker")
    print(row("GET /health", *health, health[0]))
    print(row("POST /api/escrow (202)", *post, health[0]))
    print(row("GET /api/escrow/{id}", *get, health[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack.create(Path(tmp))
        asyncio.run(stack.create_topics())
        worker = stack.worker("bench").start()
        try:
            worker.wait_healthy()
            asyncio.run(run(worker.port, stack, args.requests, args.concurrency))
        finally:
            worker.stop()


if __name__ == "__main__":
    main()
