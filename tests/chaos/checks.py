"""What every fault test checks once the faults are over, and how it waits for the end.

After a run: exactly the expected events (each once by eventId, redelivered copies equal),
every command exactly one kind of outcome, contiguous versions and only the seed's
transitions per escrow, the table equal to the newest snapshots and to the replay, every
ledger balanced, and the PostgreSQL mirror equal to the table with a reconciling ledger.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from escrow_stream.db.pool import create_pool
from escrow_stream.db.queries import reconcile
from escrow_stream.domain import Escrow, check_invariants, is_allowed_transition
from escrow_stream.messages import UNPUBLISHED_SNAPSHOT_FIELDS
from escrow_stream.runbooks import read_table_from_changelog
from tests.chaos.scenario import Expected
from tests.harness import Stack, mirrored_snapshots

SETTLE_WAIT_S = 240.0


async def produce_slowly(
    stack: Stack, commands: list[dict[str, Any]], chunk: int, pause_s: float
) -> None:
    """Produce in chunks with pauses, so the faults land while commands stream in."""
    for i in range(0, len(commands), chunk):
        await stack.send(commands[i : i + chunk])
        await asyncio.sleep(pause_s)


async def read_until_complete(
    stack: Stack, expected: Expected, wait_s: float = SETTLE_WAIT_S
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every event and rejection record (read_committed), once all expected ones are there."""
    deadline = time.monotonic() + wait_s
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
        if set(expected.event_ids) <= {e["eventId"] for e in events} and set(
            expected.rejections
        ) <= {r["commandId"] for r in rejections}:
            break
        await asyncio.sleep(2)
    return events, rejections


async def wait_for_mirror(
    stack: Stack, table: dict[str, Any], wait_s: float = SETTLE_WAIT_S
) -> dict[str, Any]:
    """The mirror's snapshots, once it has caught up with the table (bounded wait): each
    equal to the table's value as the events publish it (what ``check`` compares)."""
    deadline = time.monotonic() + wait_s
    mirrored: dict[str, Any] = {}
    caught_up = {escrow_id: published(value) for escrow_id, value in table.items()}
    while time.monotonic() < deadline:
        mirrored = await mirrored_snapshots(stack.settings, list(table))
        if mirrored == caught_up:
            break
        await asyncio.sleep(1)
    return mirrored


async def reconcile_mirror(stack: Stack, escrow_ids: list[str]) -> list[str]:
    pool = await create_pool(stack.settings)
    try:
        return await reconcile(pool, escrow_ids)
    finally:
        await pool.close()


@dataclass(frozen=True)
class Outcome:
    """What a fault run left behind, read back from Kafka, the changelog and the mirror."""

    events: list[dict[str, Any]]
    rejections: list[dict[str, Any]]
    table: dict[str, Any]
    mirrored: dict[str, Any]
    problems: list[str]


async def collect(stack: Stack, expected: Expected) -> Outcome:
    events, rejections = await read_until_complete(stack, expected)
    table = await read_table_from_changelog(stack.settings, stack.settings.kafka_group_id)
    mirrored = await wait_for_mirror(stack, table)
    problems = await reconcile_mirror(stack, list(table))
    return Outcome(events, rejections, table, mirrored, problems)


def published(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A table value as the events and the mirror carry it."""
    unpublished = {Escrow.model_fields[name].alias or name for name in UNPUBLISHED_SNAPSHOT_FIELDS}
    return {k: v for k, v in snapshot.items() if k not in unpublished}


def fault_duplicates(
    commands: list[dict[str, Any]], records: list[dict[str, Any]], cause: str
) -> int:
    """Copies of a record beyond what the commands themselves ask for.  A command sent n
    times has its recorded outcome emitted n times (the processor re-emits it for every
    redelivery, SPEC §3 rule 1); any copy past that was made by a fault — a command handled
    again after a crash whose first handling reached the log.  ``cause`` is the field
    naming the command (``causationId`` of an event, ``commandId`` of a rejection);
    records are told apart by ``eventId`` (events) or by cause (rejections)."""
    sent = Counter(c["commandId"] for c in commands)
    copies = Counter((r.get("eventId", r[cause]), r[cause]) for r in records)
    return sum(max(0, n - sent[command_id]) for (_, command_id), n in copies.items())


def check(commands: list[dict[str, Any]], expected: Expected, outcome: Outcome) -> dict[str, int]:
    """The module docstring's checks; returns the counts a fault test prints."""
    events, rejections = outcome.events, outcome.rejections
    # 1. exactly the expected events, each with its expected identity.  The first copy of an
    # event is the one emitted when its command was decided; a copy re-emitted for a
    # redelivered command carries the escrow as it is at that later time.
    distinct: dict[str, dict[str, Any]] = {}
    for event in events:
        distinct.setdefault(event["eventId"], event)
    assert set(distinct) == set(expected.event_ids), (
        f"missing {len(set(expected.event_ids) - set(distinct))}, "
        f"unexpected {len(set(distinct) - set(expected.event_ids))}"
    )
    for event_id, event in distinct.items():
        assert (
            event["escrowId"],
            event["version"],
            event["type"],
            event["causationId"],
        ) == expected.event_ids[event_id]
    for event in events:  # a redelivered copy is the same event (same id, same data)
        assert event["data"] == distinct[event["eventId"]]["data"]

    # 2. every command has exactly one kind of outcome: none lost, none applied twice
    rejected: dict[str, set[str]] = defaultdict(set)
    for r in rejections:
        rejected[r["commandId"]].add(r["code"])
    assert dict(rejected) == {c: {code} for c, code in expected.rejections.items()}
    caused = {e["causationId"] for e in distinct.values()}
    assert not caused & set(rejected)
    assert not (caused | set(rejected)) & expected.no_ops
    assert {c["commandId"] for c in commands} == caused | set(rejected) | expected.no_ops

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

    # 5. the table equals the newest snapshot (as published: without the escrow's
    # deduplication memory, messages.UNPUBLISHED_SNAPSHOT_FIELDS), matches the replay, and
    # every ledger balances
    table = outcome.table
    assert set(table) == set(expected.final)
    for escrow_id, value in table.items():
        assert published(value) == by_escrow[escrow_id][-1]["escrow"]
        escrow = Escrow.model_validate(value)
        assert escrow.status == expected.final[escrow_id].status
        assert escrow.version == expected.final[escrow_id].version
        assert check_invariants(escrow) == []

    # 6. the PostgreSQL mirror equals the table (as published), and its ledger reconciles
    assert outcome.mirrored == {escrow_id: published(v) for escrow_id, v in table.items()}
    assert outcome.problems == []
    return {
        "commands": len(commands),
        "escrows": len(table),
        "event_records": len(events),
        "events_distinct": len(distinct),
        "event_duplicates": len(events) - len(distinct),
        "event_duplicates_from_faults": fault_duplicates(commands, events, "causationId"),
        "rejection_records": len(rejections),
        "rejections_distinct": len(rejected),
        "rejection_duplicates_from_faults": fault_duplicates(commands, rejections, "commandId"),
        **{
            f"final_{k.lower()}": v for k, v in Counter(v["status"] for v in table.values()).items()
        },
    }
