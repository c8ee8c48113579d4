"""A worker that stops moving commands says so: ``/health`` 503 and a logged diagnosis.

The stall is real, not simulated: the worker's database is a port where nothing listens, so
the first release (whose payout account the processor must look up) is retried without end
while later commands wait behind it on the partition.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from escrow_stream.config import Settings
from tests.builders import wire_command
from tests.harness import Stack, free_port
from tests.integration.test_processing import BUYER, SELLER, create, funds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STALL_TIMEOUT_S = 5
DETECT_WAIT_S = 60.0


def test_a_partition_with_lag_and_no_progress_fails_liveness(
    tmp_path: Path, stack_settings: Settings
) -> None:
    stack = Stack.create(
        tmp_path,
        DATABASE_URL=f"postgresql://escrow:escrow@127.0.0.1:{free_port()}/nowhere",
        STALL_TIMEOUT_S=str(STALL_TIMEOUT_S),
    )
    asyncio.run(stack.create_topics())
    worker = stack.worker("stuck").start()
    e = f"esc-{uuid.uuid4().hex[:12]}"
    try:
        worker.wait_healthy()
        asyncio.run(
            stack.send(
                [create(e), funds(e), wire_command("MarkDelivered", e, SELLER, {"note": "ok"})]
            )
        )
        asyncio.run(stack.events(lambda es: sum(x["escrowId"] == e for x in es) >= 3))
        assert worker.get("/health")[0] == 200  # moving: healthy
        # the release needs the seller's payout account: PostgreSQL is unreachable
        asyncio.run(stack.send([wire_command("ReleaseFunds", e, BUYER)]))
        asyncio.run(stack.send([wire_command("RaiseDispute", e, SELLER, {"reason": "late"})]))
        deadline = time.monotonic() + DETECT_WAIT_S
        status, body = worker.get("/health")
        while status == 200 and time.monotonic() < deadline:
            time.sleep(1)
            status, body = worker.get("/health")
    finally:
        worker.stop()
    assert status == 503, body
    assert body["status"] == "stalled" and len(body["stalledPartitions"]) == 1
    log = worker.log_tail(200_000)
    assert "processor stalled" in log and "consumer state" in log
