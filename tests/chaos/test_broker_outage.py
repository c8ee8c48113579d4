"""Kafka stopped: POSTs are still accepted (the outbox holds them); once the broker is back
every accepted command is processed exactly once."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from escrow_stream.config import Settings
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, token
from tests.harness import Stack, require_ours, stack_sh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ACCEPTED_WHILE_DOWN = 5


def test_posts_survive_a_broker_outage(tmp_path: Path, stack_settings: Settings) -> None:
    require_ours("kafka")
    stack = Stack.create(tmp_path)
    asyncio.run(stack.create_topics())
    worker = stack.worker("outage").start()
    buyer = f"outage-{uuid.uuid4().hex[:8]}"
    bearer = token(stack, buyer)
    try:
        worker.wait_healthy()
        # the whole path works before the outage (the worker has its partitions)
        code, _, body = call(
            worker, "POST", "/api/escrow", bearer, create_body("before"), {"Prefer": "wait=30"}
        )
        assert code == 201, body
        stopped = stack_sh("down", "kafka")
        assert stopped.returncode == 0, stopped.stderr
        try:
            accepted = []
            for i in range(ACCEPTED_WHILE_DOWN):
                code, _, body = call(
                    worker,
                    "POST",
                    "/api/escrow",
                    bearer,
                    create_body(f"seller-{i}"),
                    {"Idempotency-Key": f"k-{i}"},
                )
                assert code == 202, body
                accepted.append(body["escrowId"])
        finally:
            started = stack_sh("up", "kafka")
            assert started.returncode == 0, started.stderr + started.stdout
        restarted = worker.proc is not None and worker.proc.poll() is not None
        if restarted:
            worker.start()  # an orchestrator restarts a worker that gave up on the broker
        worker.wait_healthy()

        deadline = time.monotonic() + 240
        events: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            events = asyncio.run(stack.events(lambda es: False, timeout_s=2))
            if {e["escrowId"] for e in events} >= set(accepted):
                break
            time.sleep(2)
    finally:
        stack.stop_all()
        stack_sh("up", "kafka")

    created = [e for e in events if e["escrowId"] in accepted]
    distinct = {str(e["eventId"]): e for e in created}
    # one effect per accepted command: one EscrowCreated (version 1) per escrow; a record
    # sent again (the relay retrying a send whose ack was lost) carries the same eventId
    assert sorted(str(e["escrowId"]) for e in distinct.values()) == sorted(accepted)
    assert {(e["type"], e["version"]) for e in distinct.values()} == {("EscrowCreated", 1)}
    print(
        f"\noutage: {len(accepted)} accepted while down; {len(created)} event records, "
        f"{len(distinct)} distinct; worker {'restarted' if restarted else 'rode it out'}"
    )
    rejections = asyncio.run(stack.rejections(lambda rs: False, timeout_s=2))
    assert not [r for r in rejections if r["escrowId"] in accepted]
