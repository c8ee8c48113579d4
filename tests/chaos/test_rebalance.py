"""Two workers split the partitions; when one stops the other takes over its escrows with
their state recovered from the changelog."""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError

from escrow_stream.config import Settings
from escrow_stream.kafka import client_kwargs
from escrow_stream.topics import COMMANDS_PARTITIONS
from tests.chaos.checks import fault_duplicates
from tests.chaos.scenario import SELLER, escrow_script
from tests.harness import Stack, activate_payouts, default_guarantee

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ESCROWS = 30
GROUP_WAIT_S = 120.0


async def member_assignments(settings: Settings, group_id: str) -> list[int]:
    """How many partitions of the commands topic each live member of the group holds."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group_id])
    finally:
        await admin.close()
    counts: list[int] = []
    for response in described:
        for group in response.groups:
            for member in group[5]:
                if not member[-1]:  # mid-rebalance: no assignment yet
                    counts.append(0)
                    continue
                assignment = ConsumerProtocolMemberAssignment.decode(member[-1])
                topic = settings.kafka_commands_topic
                counts.append(sum(tp.topic == topic for tp in assignment.partitions()))
    return counts


async def wait_for_members(settings: Settings, group_id: str, members: int) -> list[int]:
    deadline = asyncio.get_running_loop().time() + GROUP_WAIT_S
    counts: list[int] = []
    while asyncio.get_running_loop().time() < deadline:
        try:
            counts = await member_assignments(settings, group_id)
        except KafkaError as exc:  # e.g. the coordinator of a brand-new broker is not up yet
            if not exc.retriable:
                raise
            await asyncio.sleep(1)
            continue
        # every partition held, not only every member: right after a member leaves, the
        # one that stays still shows its old assignment until the rebalance ends
        if len(counts) == members and all(counts) and sum(counts) == COMMANDS_PARTITIONS:
            return counts
        await asyncio.sleep(1)
    raise AssertionError(f"group never had {members} members with partitions: {counts}")


def escrows_with(events: list[dict[str, Any]], *types: str) -> set[str]:
    """Escrows that have an event of one of these types.  Counting escrows, not records:
    a command redelivered after the takeover re-emits its recorded events (same eventIds),
    so a count of records would run ahead of the escrows actually done."""
    return {e["escrowId"] for e in events if e["type"] in types}


def by_escrow(events: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for e in events:
        out[e["escrowId"]][e["version"]] = e
    return out


async def duplicated_records(stack: Stack) -> list[tuple[str, str, int, int, int, int]]:
    """Every copy of each event read more than once: (escrowId, type, version, partition,
    offset, timestamp ms), to tell which worker wrote which copy and when."""
    records = await stack.read(
        stack.settings.kafka_events_topic, lambda rs: False, 5, isolation_level="read_committed"
    )
    copies: dict[str, list[tuple[str, str, int, int, int, int]]] = defaultdict(list)
    for r in records:
        e = json.loads(r.value)
        copies[e["eventId"]].append(
            (e["escrowId"], e["type"], e["version"], r.partition, r.offset, r.timestamp)
        )
    return sorted(c for cs in copies.values() if len(cs) > 1 for c in cs)


def test_two_workers_split_and_take_over(tmp_path: Path, stack_settings: Settings) -> None:
    guarantee = os.environ.get("CHAOS_PROCESSING_GUARANTEE") or default_guarantee()
    stack = Stack.create(
        tmp_path, KAFKA_SESSION_TIMEOUT_MS="10000", KAFKA_PROCESSING_GUARANTEE=guarantee
    )
    asyncio.run(stack.create_topics())
    asyncio.run(activate_payouts(stack.settings, SELLER["id"]))
    rng = random.Random(7)
    run = uuid.uuid4().hex[:6]
    scripts = [escrow_script(f"rb-{run}-{i:02d}", rng) for i in range(ESCROWS)]
    first_half = [c for s in scripts for c in s[:4]]  # create .. funds: FUNDS_HELD
    second_half = [c for s in scripts for c in s[4:]]
    group = stack.settings.kafka_group_id

    w1 = stack.worker("w1").start()
    w2 = stack.worker("w2").start()
    try:
        w1.wait_healthy()
        w2.wait_healthy()
        counts = asyncio.run(wait_for_members(stack.settings, group, 2))
        assert sorted(counts) == [3, 3], counts  # 6 command partitions split evenly

        asyncio.run(stack.send(first_half))
        held = asyncio.run(
            stack.events(lambda es: len(escrows_with(es, "EscrowFundsHeld")) == ESCROWS)
        )
        assert len(escrows_with(held, "EscrowFundsHeld")) == ESCROWS

        assert w2.stop() == 0, w2.log_tail()
        counts = asyncio.run(wait_for_members(stack.settings, group, 1))
        assert counts == [6], counts  # the survivor owns every partition

        asyncio.run(stack.send(second_half))
        events = asyncio.run(
            stack.events(
                lambda es: len(escrows_with(es, "EscrowReleased", "EscrowRefunded")) == ESCROWS,
                timeout_s=120,
            )
        )
    finally:
        stack.stop_all()

    histories = by_escrow(events)
    assert len(histories) == ESCROWS
    for escrow_id, versions in histories.items():
        # the survivor continued every escrow from its recovered state: no gap, no restart
        assert sorted(versions) == list(range(1, len(versions) + 1)), escrow_id
        final = versions[max(versions)]["escrow"]
        assert final["status"] in ("RELEASED", "REFUNDED"), (escrow_id, final["status"])
    duplicates = fault_duplicates(first_half + second_half, events, "causationId")
    print(
        f"\nrebalance ({guarantee}): {ESCROWS} escrows finished on the surviving worker; "
        f"{len(events)} event records (read_committed), {duplicates} duplicated by the handover"
    )
    if guarantee == "exactly_once":  # the leaving worker committed all it had done
        if duplicates:
            for copy in asyncio.run(duplicated_records(stack)):
                print("duplicated:", copy)
        assert duplicates == 0
