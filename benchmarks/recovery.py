"""Recovery benchmark: restarting a worker whose table holds ``--escrows`` escrows (100,000 by
default), and the timeout processor's cost at that size.

Run with the local stack up (``make run`` or ``make stack-up``)::

    .venv/bin/python -m benchmarks.recovery [--escrows 100000]

1. **Fill**: ``--escrows`` CreateEscrow commands through a real ``escrow-stream worker``
   (KYC gating on, the users verified through ``PUT /api/kyc/{user}``), produced as fast as
   the producer goes, until every EscrowCreated is read. Nothing is written behind the
   worker's back: the table, its changelog and the events are the worker's own.
2. **Restart from local RocksDB**: the worker stopped (SIGTERM) and started again with the
   same ``DATA_DIR``; a RecordPaymentInstructions for one of the escrows is waiting on the
   commands topic; the time from starting the process to reading its event (which needs
   the escrow's state: without it the command is rejected and never gives an event).
3. **Restart with an empty DATA_DIR**: the same, for a new worker of the same group with
   an empty data directory, which restores the table from its changelog topic.
4. **The timeout processor at that size, nothing due** (every escrow waits for payment,
   7 days): with the first worker stopped, its RocksDB partitions opened read-only with
   the options Faust uses and iterated as Faust's store does; then, in this process,
   ``escrow_stream.agents.timeouts.TimeoutScanner.tick`` over them (the timer's body: the
   first tick rebuilds the deadline index, as after every rebalance; a later tick is the
   steady state), and ``due_timeouts`` (the full scan the timer did before the index).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from benchmarks.common import (
    Stopwatch,
    Table,
    bench_env,
    cleanup,
    command_line,
    ms,
    prepare,
    verify_kyc,
)
from benchmarks.pipeline import (
    BUYER,
    READY_WAIT_S,
    SELLER,
    SYSTEM,
    Reader,
    burst,
    causation_of,
    lifecycle,
    partitions_of,
    records_of,
    warm_up,
)
from escrow_stream.agents import timeouts
from escrow_stream.config import domain_settings
from escrow_stream.tables import escrows as escrow_table
from tests.builders import wire_command
from tests.harness import Stack, WorkerProcess, unique

#: Faust's key for the changelog offset it stores in each partition's RocksDB.
FAUST_OFFSET_KEY = b"__faust\0offset__"
RESTART_WAIT_S = 600.0


def probe(secret: str, escrow_id: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A command that needs the escrow's state: accepted (an event) only if it is there."""
    command = wire_command(
        "RecordPaymentInstructions",
        escrow_id,
        SYSTEM,
        {"provider": "stripe", "providerPaymentId": f"pi_{escrow_id}"},
    )
    return records_of(secret, [command])[0]


async def first_command_after_start(stack: Stack, worker: WorkerProcess, escrow_id: str) -> float:
    """Seconds from starting ``worker`` to reading the event of a command waiting for it."""
    settings = stack.settings
    record = probe(stack.secret(), escrow_id)
    reader = Reader(settings, settings.kafka_events_topic)
    await reader.start()
    try:
        await stack.send_raw([record])
        started = time.perf_counter()
        worker.start()
        await reader.until(
            {causation_of(record[1])},
            RESTART_WAIT_S,
            lambda: worker.proc is not None and worker.proc.poll() is None,
        )
        return reader.seen[causation_of(record[1])] - started
    finally:
        await reader.stop()


async def changelog_records(stack: Stack) -> int:
    """Records in the escrows table's changelog topic (what an empty DATA_DIR restores)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from escrow_stream.kafka import client_kwargs

    topic = escrow_table.changelog_topic_name(stack.settings.kafka_group_id)
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_kwargs(stack.settings))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(stack.settings, topic)]
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()


# -- the timeout processor over the worker's own RocksDB -----------------------------------


class RocksTable(Mapping[str, Any]):
    """A stopped worker's ``escrows`` table read from its RocksDB partitions, as Faust's
    RocksDB store reads them (raw mode, the offset key skipped, keys JSON-encoded)."""

    def __init__(self, data_dir: Path) -> None:
        from rocksdict import AccessType, Options, Rdict

        self.paths = sorted(data_dir.glob(f"**/tables/{escrow_table.TABLE_NAME}-*.db"))
        assert self.paths, f"no escrows table under {data_dir}"
        self.dbs = [
            Rdict(str(p), options=Options(raw_mode=True), access_type=AccessType.read_only())
            for p in self.paths
        ]

    def __getitem__(self, key: str) -> Any:
        raw = json.dumps(key).encode()
        for db in self.dbs:
            value = db.get(raw)
            if value is not None:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        for db in self.dbs:
            for key in db.keys():  # noqa: SIM118 (an Rdict, not a dict)
                if key != FAUST_OFFSET_KEY:
                    yield json.loads(cast(bytes, key))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        for db in self.dbs:
            for key, value in db.items():
                if key != FAUST_OFFSET_KEY:
                    yield value

    def close(self) -> None:
        for db in self.dbs:
            db.close()


class Owned:
    """One owner's key that never changes, always ready: a worker between rebalances."""

    def key(self) -> Hashable:
        return "bench"

    def ready(self) -> bool:
        return True


async def timed(call: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """The median duration of ``repeat`` calls (awaited when a call returns an awaitable:
    the scanner's tick is a coroutine now), and the last call's result."""
    durations, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        if inspect.isawaitable(result):
            result = await result
        durations.append(time.perf_counter() - started)
    return statistics.median(durations), result


async def timeout_costs(data_dir: Path, stack: Stack, table: Table) -> None:
    """Rows for the timeout processor at this size, through its public functions, in one
    event loop of this process with nothing else running on it."""
    settings = stack.settings
    rules = domain_settings(settings)
    now = datetime.now(UTC)
    rocks = RocksTable(data_dir)
    try:
        iterate_s, values = await timed(lambda: list(rocks.values()))
        table.add(
            f"iterate the escrows table's RocksDB ({len(values):,} values, "
            f"{len(rocks.paths)} partitions)",
            ms(iterate_s),
        )
        if hasattr(timeouts, "TimeoutScanner"):
            from escrow_stream.tables.deadlines import DeadlineIndex

            index = DeadlineIndex(rules, settings.stripe_hold_warn_days)
            scanner = timeouts.TimeoutScanner(rocks, index, rules, Owned())
            first_s, first = await timed(lambda: scanner.tick(now))
            table.add(
                "TimeoutScanner.tick that rebuilds the deadline index (as after a "
                f"rebalance): {first.rebuilt_from:,} escrows read, {len(first.commands)} due",
                ms(first_s),
            )
            tick_s, tick = await timed(lambda: scanner.tick(now), repeat=5)
            table.add(
                f"TimeoutScanner.tick, steady state, nothing due: {tick.read} escrows read, "
                f"{tick.indexed:,} indexed",
                ms(tick_s),
            )
        if hasattr(timeouts, "due_timeouts"):
            scan_s, due = await timed(
                lambda: timeouts.due_timeouts(values, now, rules, settings.stripe_hold_warn_days)
            )
            table.add(
                f"due_timeouts, the full scan of every snapshot the timer did before the "
                f"index ({len(due)} due; the iteration above not included)",
                ms(scan_s),
            )
    finally:
        rocks.close()


# -- the run -------------------------------------------------------------------------------


def run(argv: Sequence[str] | None = None) -> Table:
    parser = argparse.ArgumentParser(
        prog="benchmarks.recovery", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--escrows", type=int, default=100_000)
    args = parser.parse_args(argv)
    clock = Stopwatch()
    table = Table(
        f"Recovery: {args.escrows:,} escrows in the table",
        command_line("benchmarks.recovery", list(argv or [])),
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    stack = Stack.create(tmp, **bench_env())
    settings = stack.settings
    commands, events = settings.kafka_commands_topic, settings.kafka_events_topic
    try:
        prepare(stack)
        secret = stack.secret()
        first = stack.worker("w1").start()
        first.wait_healthy(READY_WAIT_S)
        first.wait_processing(READY_WAIT_S)
        verify_kyc(stack, first, [BUYER["id"], SELLER["id"]])
        asyncio.run(
            warm_up(settings, commands, events, records_of(secret, lifecycle(unique("warm"))))
        )
        run_id = unique("rec")
        ids = [f"{run_id}-{i}" for i in range(args.escrows)]
        creates = [lifecycle(escrow_id)[0] for escrow_id in ids]
        fill_rate, _ = asyncio.run(
            burst(
                settings,
                commands,
                events,
                records_of(secret, creates),
                timeout_s=max(600.0, args.escrows / 20),
            )
        )
        table.add(
            f"fill: {args.escrows:,} CreateEscrow through the worker, commands/s",
            f"{fill_rate:,.0f}",
        )
        stopping = time.perf_counter()
        code = first.stop()
        assert code == 0, first.log_tail()
        table.add("worker stop (SIGTERM) with that table", ms(time.perf_counter() - stopping))
        restored = asyncio.run(changelog_records(stack))

        again = stack.worker("w1")  # the same DATA_DIR
        local_s = asyncio.run(first_command_after_start(stack, again, ids[0]))
        table.add("restart from local RocksDB to the first command processed", f"{local_s:.2f} s")
        assert again.stop() == 0, again.log_tail()

        empty = stack.worker("w-empty")  # a new, empty DATA_DIR
        assert not (tmp / "w-empty").exists()
        empty_s = asyncio.run(first_command_after_start(stack, empty, ids[1]))
        table.add(
            f"restart with an empty DATA_DIR (changelog restore, {restored:,} records) "
            "to the first command processed",
            f"{empty_s:.2f} s",
        )
        assert empty.stop() == 0, empty.log_tail()

        try:
            asyncio.run(timeout_costs(tmp / "w1", stack, table))
        except Exception as exc:  # the restart figures stand; the table says what failed
            table.add("timeout processor at this size", f"failed: {exc!r}"[:300])
            print(f"benchmarks.recovery: timeout measurement failed: {exc!r}", file=sys.stderr)
    except BaseException:
        for worker in stack.workers:
            print(f"--- {worker.name}\n{worker.log_tail(3000)}", file=sys.stderr)
        raise
    finally:
        cleanup(stack)
        shutil.rmtree(tmp, ignore_errors=True)
    table.notes = [
        "Restart times run from starting the process (imports included) to reading the "
        "event of a command that was waiting on the commands topic.",
        "Timeout costs: one call each in this process, over the stopped worker's RocksDB "
        "(a steady tick: median of 5).",
    ]
    table.seconds = clock.seconds
    return table


def main() -> None:
    print(run(sys.argv[1:]).markdown())


if __name__ == "__main__":
    main()
