"""Pipeline benchmark: the real worker against Faust's own ceiling and a PostgreSQL design,
in one process run on the local broker and database.

Run with the local stack up (``make run`` or ``make stack-up``)::

    .venv/bin/python -m benchmarks.pipeline [--escrows 1000] [--latency-seconds 20]

Three throughputs, each over the same commands (``--escrows`` whole lifecycles of six
commands: create, payment instructions, funds, delivered, release, settlement confirmed;
interleaved, so every escrow is in flight at once):

1. **ceiling**: a bare Faust agent of the processor's shape (``benchmarks/ceiling_app.py``:
   ``json.loads``, RocksDB table get+set, one send to a 12-partition topic) in its own
   worker process, own group, topics and data directory. Commands produced as fast as the
   producer goes, forwarded messages read back: messages / (last read - first send).
2. **baseline**: the original design, one PostgreSQL transaction per command (lock the
   escrow row, version check, insert the events, their outbox rows and the idempotency row;
   the same decision code and the same KYC and payout-account lookups as the processor),
   16 concurrent connections, each escrow's commands in order, in scratch tables of a
   scratch schema that is dropped afterwards.
3. **pipeline**: ``escrow-stream worker`` (``tests.harness.Stack``), as in production: the
   PostgreSQL mirror and the timeout timer in the process, KYC gating on (the bench users
   are verified through ``PUT /api/kyc/{user}`` first). Measured like the ceiling: commands
   / (first event of the last command read - first send); then how long the mirror took
   to have every event in PostgreSQL.

Then latency at half load: an open-loop producer at 50 % of the pipeline's measured rate
for ``--latency-seconds`` (≥ 20 s), staggered lifecycles so the command mix is steady;
latency = first event read (matched by causationId) - the command's *scheduled* send time
(so a producer that falls behind cannot hide queueing). And bytes per event: the mean value
size of the events the pipeline wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from benchmarks.common import (
    CpuSample,
    Stopwatch,
    Table,
    activate_seller,
    bench_env,
    cleanup,
    command_line,
    cpu_note,
    delete_topics,
    ms,
    prepare,
    quantile,
    stack_pids,
    verify_kyc,
)
from escrow_stream.agents import handling
from escrow_stream.config import Settings, domain_settings
from escrow_stream.db import payouts
from escrow_stream.domain import DecisionContext
from escrow_stream.kafka import client_kwargs, topic_partitions
from escrow_stream.messages import encode_event
from escrow_stream.signing import signature_headers
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.topics import COMMANDS_PARTITIONS, EVENTS_PARTITIONS, TopicSpec, create_topics
from tests.builders import wire_command
from tests.harness import Stack, WorkerProcess, unique

BUYER = {"id": "bench-buyer", "role": "user"}
SELLER = {"id": "bench-seller", "role": "user"}
SYSTEM = {"id": "payments-agent", "role": "system"}
AMOUNT = 10_000
BASELINE_CONCURRENCY = 16
READY_WAIT_S = 120.0
#: A reader partition at the same position below its end offset this long is sought again.
READER_STALL_S = 2.0

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]


def lifecycle(escrow_id: str) -> list[dict[str, Any]]:
    create = {
        "offerId": "o",
        "contractId": "c",
        "buyerId": BUYER["id"],
        "sellerId": SELLER["id"],
        "rail": "STRIPE",
        "amount": str(AMOUNT),
        "currency": "USD",
    }
    return [
        wire_command("CreateEscrow", escrow_id, BUYER, create),
        wire_command(
            "RecordPaymentInstructions",
            escrow_id,
            SYSTEM,
            {"provider": "stripe", "providerPaymentId": f"pi_{escrow_id}"},
        ),
        wire_command(
            "ConfirmFunds",
            escrow_id,
            SYSTEM,
            {
                "provider": "stripe",
                "providerPaymentId": f"pi_{escrow_id}",
                "amount": str(AMOUNT),
                "currency": "USD",
            },
        ),
        wire_command("MarkDelivered", escrow_id, SELLER),
        wire_command("ReleaseFunds", escrow_id, BUYER),
        wire_command(
            "ConfirmSettlement",
            escrow_id,
            SYSTEM,
            {
                "settlementId": f"escrow-release:{escrow_id}:all:1",
                "provider": "stripe",
                "providerReference": f"tr_{escrow_id}",
                "amount": str(AMOUNT),
            },
        ),
    ]


STEPS = len(lifecycle("x"))


def lifecycles(escrows: int, prefix: str) -> list[list[dict[str, Any]]]:
    return [lifecycle(unique(prefix)) for _ in range(escrows)]


def interleaved(lives: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Step k of every escrow before step k+1 of any: every escrow in flight at once."""
    return [life[k] for k in range(STEPS) for life in lives]


def staggered(lives: list[list[dict[str, Any]]], group: int = 20) -> list[dict[str, Any]]:
    """Groups of escrows starting one wave apart, each wave holding step k of group w-k:
    in steady state every wave has the same mix of command types."""
    groups = [lives[i : i + group] for i in range(0, len(lives), group)]
    out: list[dict[str, Any]] = []
    for wave in range(len(groups) + STEPS - 1):
        for k in range(STEPS):
            g = wave - k
            if 0 <= g < len(groups):
                out.extend(life[k] for life in groups[g])
    return out


def records_of(secret: str, commands: list[dict[str, Any]]) -> list[Record]:
    """Commands as producers put them on the wire: keyed by escrowId, system ones signed."""
    out = []
    for c in commands:
        value = json.dumps(c).encode()
        headers = signature_headers(secret, value) if c["actor"]["role"] == "system" else []
        out.append((c["escrowId"].encode(), value, headers))
    return out


# -- producing and reading --------------------------------------------------------------


def causation_of(value: bytes) -> str:
    data = json.loads(value)
    return str(data.get("causationId") or data["commandId"])


@dataclass
class Reader:
    """Reads a topic from its current end; the first arrival time of each id of interest."""

    settings: Settings
    topic: str
    id_of: Callable[[bytes], str] = causation_of
    isolation_level: str = "read_uncommitted"
    seen: dict[str, float] = field(default_factory=dict)
    records: int = 0
    value_bytes: int = 0
    #: Partitions sought again after a stall (see :meth:`until`).
    reseeks: int = 0
    _still: dict[TopicPartition, tuple[int, float]] = field(default_factory=dict)
    _consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            isolation_level=self.isolation_level,
            **client_kwargs(self.settings),
        )
        await self._consumer.start()
        tps = [
            TopicPartition(self.topic, p) for p in await partitions_of(self.settings, self.topic)
        ]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, before anything is produced
            await self._consumer.position(tp)

    async def until(
        self, wanted: set[str], timeout_s: float, alive: Callable[[], bool] = lambda: True
    ) -> None:
        """Until every id in ``wanted`` was read (or the timeout, or ``alive()`` is false)."""
        assert self._consumer is not None
        deadline = time.monotonic() + timeout_s
        missing = set(wanted) - self.seen.keys()
        checked = time.monotonic()
        while missing and time.monotonic() < deadline:
            if not alive():
                raise AssertionError(f"{self.topic}: the process under test has exited")
            batches = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.perf_counter()
            for batch in batches.values():
                for r in batch:
                    self.records += 1
                    self.value_bytes += len(r.value or b"")
                    key = self.id_of(r.value)
                    if key not in self.seen:
                        self.seen[key] = now
                        missing.discard(key)
            if time.monotonic() - checked >= 1.0:
                await self._unstall()
                checked = time.monotonic()
        if missing:
            raise AssertionError(f"{self.topic}: {len(missing)} of {len(wanted)} never arrived")

    async def _unstall(self) -> None:
        """Seek each partition that has stayed at the same position below its end offset for
        ``READER_STALL_S`` to that position.

        An aiokafka (0.14) read_uncommitted consumer was seen to stop fetching partitions of
        the transactional events topic with records left (positions unchanged for minutes,
        while a new consumer read on from the same offsets): the benchmark then waited
        forever, also on the code before 2026-12-01.  A seek drops the partition's fetch
        state and fetches again.  Counted in ``reseeks``; the benchmark prints the count."""
        assert self._consumer is not None
        tps = sorted(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps)
        now = time.monotonic()
        for tp in tps:
            position = await self._consumer.position(tp)
            since = self._still.get(tp)
            if position >= ends[tp] or since is None or since[0] != position:
                self._still[tp] = (position, now)
            elif now - since[1] >= READER_STALL_S:
                self._consumer.seek(tp, position)
                self._still[tp] = (position, now)
                self.reseeks += 1

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


async def partitions_of(settings: Settings, topic: str, timeout_s: float = 30) -> list[int]:
    """The topic's partitions, once the broker's metadata has them (a new topic's may not)."""
    deadline = time.monotonic() + timeout_s
    while not (found := await topic_partitions(settings, topic)):
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {topic} has no partitions after {timeout_s}s")
        await asyncio.sleep(0.2)
    return sorted(found)


def producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(acks="all", linger_ms=5, **client_kwargs(settings))


async def burst(
    settings: Settings,
    source: str,
    sink: str,
    records: list[Record],
    timeout_s: float = 600,
    isolation_level: str = "read_uncommitted",
) -> tuple[float, Reader]:
    """Produce ``records`` as fast as the producer goes while reading ``sink``: records /
    (first arrival of the last one - first send)."""
    reader = Reader(settings, sink, isolation_level=isolation_level)
    await reader.start()
    wanted = {causation_of(v) for _, v, _ in records}
    out = producer(settings)
    await out.start()
    try:
        reading = asyncio.create_task(reader.until(wanted, timeout_s))
        started = time.perf_counter()
        futures = [await out.send(source, value=v, key=k, headers=h) for k, v, h in records]
        await asyncio.gather(*futures)
        await reading
        return len(records) / (max(reader.seen.values()) - started), reader
    finally:
        await out.stop()
        await reader.stop()


async def warm_up(
    settings: Settings,
    source: str,
    sink: str,
    records: list[Record],
    alive: Callable[[], bool] = lambda: True,
    isolation_level: str = "read_uncommitted",
) -> None:
    """A few records through, until their outputs are read: the consumer has its
    partitions and the tables are open."""
    reader = Reader(settings, sink, isolation_level=isolation_level)
    await reader.start()
    out = producer(settings)
    await out.start()
    try:
        for k, v, h in records:
            await out.send_and_wait(source, value=v, key=k, headers=h)
        await reader.until({causation_of(v) for _, v, _ in records}, READY_WAIT_S, alive)
    finally:
        await out.stop()
        await reader.stop()


@dataclass
class Latencies:
    values: list[float]
    rate: float
    seconds: float
    behind_max: float
    reseeks: int = 0


async def open_loop(
    settings: Settings,
    source: str,
    sink: str,
    records: list[Record],
    per_s: float,
    isolation_level: str = "read_uncommitted",
) -> Latencies:
    """Send ``records`` at ``per_s`` on a fixed schedule (not waiting for answers); each
    one's latency from its scheduled send time to its first output read."""
    reader = Reader(settings, sink, isolation_level=isolation_level)
    await reader.start()
    out = producer(settings)
    await out.start()
    wanted = {causation_of(v) for _, v, _ in records}
    scheduled: dict[str, float] = {}
    behind_max = 0.0
    try:
        reading = asyncio.create_task(reader.until(wanted, 600))
        started = time.perf_counter()
        i = 0
        while i < len(records):
            now = time.perf_counter()
            due = min(len(records), int((now - started) * per_s) + 1)
            while i < due:
                k, v, h = records[i]
                at = started + i / per_s
                scheduled[causation_of(v)] = at
                behind_max = max(behind_max, now - at)
                await out.send(source, value=v, key=k, headers=h)
                i += 1
            await asyncio.sleep(max(0.0, started + i / per_s - time.perf_counter()))
        await out.flush()
        sent_s = time.perf_counter() - started
        await reading
        return Latencies(
            [reader.seen[c] - at for c, at in scheduled.items()],
            len(records) / sent_s,
            sent_s,
            behind_max,
            reader.reseeks,
        )
    finally:
        await out.stop()
        await reader.stop()


# -- 1. the ceiling: a bare Faust agent ----------------------------------------------------


def topic_spec(settings: Settings, name: str, partitions: int) -> TopicSpec:
    """A topic configured as ours are (``escrow_stream.topics``), but of the bench's own."""
    return TopicSpec(
        name,
        partitions,
        1,
        {"cleanup.policy": "delete", "compression.type": settings.kafka_compression},
    )


def _py_spy() -> str:
    """py-spy beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else "py-spy"


@contextmanager
def profiled(pid: int, out: Path | None) -> Iterator[None]:
    """``py-spy record`` of process ``pid`` for the body (raw collapsed stacks to ``out``,
    idle frames left out); nothing without ``out``."""
    if out is None:
        yield
        return
    try:
        spy = subprocess.Popen(
            [_py_spy(), "record", "-f", "raw", "-r", "200", "-o", str(out), "--pid", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        print("note: no py-spy (pip install py-spy): not profiled", file=sys.stderr)
        yield
        return
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


class Ceiling:
    """``benchmarks/ceiling_app.py`` as its own worker process, with its own group, topics
    (configured as ours) and data directory; topics deleted at :meth:`stop`."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.app_id = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
        self.source, self.sink = f"{self.app_id}.in", f"{self.app_id}.out"
        self.log = tmp / "ceiling.log"
        self.data_dir = tmp / "ceiling"
        self.proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, warm: list[Record]) -> None:
        asyncio.run(
            create_topics(
                self.settings,
                [
                    topic_spec(self.settings, self.source, COMMANDS_PARTITIONS),
                    topic_spec(self.settings, self.sink, EVENTS_PARTITIONS),
                    # Faust makes its changelog itself, but its first event may come before
                    # the broker's metadata has it (PartitionsMismatch): made here, as Faust
                    # would make it
                    TopicSpec(
                        f"{self.app_id}-state-changelog",
                        COMMANDS_PARTITIONS,
                        1,
                        {"cleanup.policy": "compact"},
                    ),
                ],
            )
        )
        env = {
            **os.environ,
            "CEILING_APP_ID": self.app_id,
            "CEILING_SOURCE": self.source,
            "CEILING_SINK": self.sink,
            "CEILING_DATA_DIR": str(self.data_dir),
            "KAFKA_BROKERS": self.settings.kafka_brokers,
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.ceiling_app", "worker", "-l", "warn"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        asyncio.run(warm_up(self.settings, self.source, self.sink, warm, self.alive))

    def burst(self, records: list[Record], profile: Path | None) -> float:
        assert self.proc is not None
        with profiled(self.proc.pid, profile):
            per_s, _ = asyncio.run(burst(self.settings, self.source, self.sink, records))
        return per_s

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        asyncio.run(delete_topics(self.settings, [f"{self.app_id}.", f"{self.app_id}-"]))


# -- 2. the baseline: a PostgreSQL transaction per command ---------------------------------

SCRATCH_TABLES = """
CREATE TABLE escrows (
    id text PRIMARY KEY, version integer NOT NULL, snapshot jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE escrow_events (
    event_id uuid PRIMARY KEY, escrow_id text NOT NULL, version integer NOT NULL,
    type text NOT NULL, data jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (escrow_id, version)
);
CREATE TABLE outbox (
    id bigserial PRIMARY KEY, topic text NOT NULL, key text NOT NULL, payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz
);
CREATE TABLE command_idempotency (
    command_id text PRIMARY KEY, escrow_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


class PostgresDesign:
    """One transaction per command: lock the row, check the version, write the state, the
    events, their outbox rows and the idempotency row (the original service's write path)."""

    def __init__(self, settings: Settings) -> None:
        self.rules = domain_settings(settings)
        self.secret = settings.internal_command_secret.get_secret_value()
        self.outcomes: dict[str, int] = {}

    async def handle(
        self, conn: asyncpg.Connection, key: bytes, value: bytes, headers: Any
    ) -> None:
        command = handling.read_command(key, value)
        assert not isinstance(command, handling.Outcome), command
        escrow_id = command.escrow_id
        async with conn.transaction():
            row = await conn.fetchrow(
                "SELECT version, snapshot::text AS s FROM escrows WHERE id = $1 FOR UPDATE",
                escrow_id,
            )
            fresh = await conn.fetchval(
                "INSERT INTO command_idempotency (command_id, escrow_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING RETURNING true",
                command.command_id,
                escrow_id,
            )
            if not fresh:
                self._count("duplicate")
                return
            state = escrow_table.load(row["s"].encode()) if row else None
            context = await self._context(conn, command, state)
            outcome = handling.handle_command(
                command,
                value,
                headers,
                state,
                None,
                datetime.now(UTC),
                self.rules,
                self.secret,
                context,
            )
            if outcome.rejection is not None or outcome.state is None:
                self._count(f"rejected {outcome.rejection.code if outcome.rejection else ''}")
                body = (
                    outcome.rejection.model_dump_json(by_alias=True) if outcome.rejection else "{}"
                )
                await conn.execute(
                    "INSERT INTO outbox (topic, key, payload) VALUES ('rejections', $1, $2::jsonb)",
                    escrow_id,
                    body,
                )
                return
            new = outcome.state
            snapshot = escrow_table.dump(new).decode()
            if row is None:
                await conn.execute(
                    "INSERT INTO escrows (id, version, snapshot) VALUES ($1, $2, $3::jsonb)",
                    escrow_id,
                    new.version,
                    snapshot,
                )
            else:
                updated = await conn.execute(
                    "UPDATE escrows SET version = $2, snapshot = $3::jsonb, updated_at = now() "
                    "WHERE id = $1 AND version = $4",
                    escrow_id,
                    new.version,
                    snapshot,
                    row["version"],
                )
                assert updated == "UPDATE 1", updated  # the version check
            bodies = [encode_event(e).decode() for e in outcome.events]
            await conn.executemany(
                "INSERT INTO escrow_events (event_id, escrow_id, version, type, data) "
                "VALUES ($1, $2, $3, $4, $5::jsonb)",
                [
                    (str(e.event_id), escrow_id, e.version, e.type, b)
                    for e, b in zip(outcome.events, bodies, strict=True)
                ],
            )
            await conn.executemany(
                "INSERT INTO outbox (topic, key, payload) VALUES ('events', $1, $2::jsonb)",
                [(escrow_id, b) for b in bodies],
            )
            self._count("accepted")

    async def _context(
        self, conn: asyncpg.Connection, command: Any, state: Any
    ) -> DecisionContext | None:
        """The processor's lookups (``CommandProcessor._context_for``), on this connection."""
        parties, releases = handling.facts_needed(command, state)
        verified: frozenset[str] = frozenset()
        payout = None
        if parties and self.rules.feature_kyc_gating:
            rows = await conn.fetch(
                "SELECT user_id FROM public.kyc_status "
                "WHERE user_id = ANY($1::text[]) AND status = 'VERIFIED'",
                list(parties),
            )
            verified = frozenset(r["user_id"] for r in rows)
        if releases and state is not None:
            account = await payouts.get(conn, state.seller_id, state.rail)
            payout = account.payout_destination() if account is not None else None
        if not verified and payout is None:
            return None
        return DecisionContext(kyc_verified_user_ids=verified, seller_payout=payout)

    def _count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


async def baseline(settings: Settings, lives: list[list[Record]]) -> tuple[float, dict[str, int]]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    url = settings.database_url.get_secret_value()
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        await admin.execute(f'SET search_path TO "{schema}"; {SCRATCH_TABLES}')
        pool = await asyncpg.create_pool(
            url,
            min_size=BASELINE_CONCURRENCY,
            max_size=BASELINE_CONCURRENCY,
            server_settings={"search_path": f'"{schema}",public'},
        )
        design = PostgresDesign(settings)
        queue: asyncio.Queue[list[Record]] = asyncio.Queue()
        for life in lives:
            queue.put_nowait(life)

        async def client() -> None:
            async with pool.acquire() as conn:
                while not queue.empty():
                    for key, value, headers in queue.get_nowait():
                        await design.handle(conn, key, value, headers)

        try:
            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(BASELINE_CONCURRENCY)))
            elapsed = time.perf_counter() - started
        finally:
            await pool.close()
        return sum(len(life) for life in lives) / elapsed, design.outcomes
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


# -- 3. the real worker ---------------------------------------------------------------------


async def last_records_end(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], tail: int = 50, timeout_s: float = 60
) -> dict[TopicPartition, int]:
    """Per partition, one past the offset of its last record (0 when it has none), read
    from the last ``tail`` offsets (transaction markers take an offset each, no record)."""
    ends = await consumer.end_offsets(tps)
    consumer.assign(tps)
    last = {tp: 0 for tp in tps}
    for tp in tps:
        consumer.seek(tp, max(0, ends[tp] - tail))
    deadline = time.monotonic() + timeout_s
    while short := [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
        if time.monotonic() > deadline:  # the reader stall Reader._unstall works around
            raise TimeoutError(f"not read to their end offsets in {timeout_s:.0f} s: {short}")
        for tp, records in (await consumer.getmany(timeout_ms=500)).items():
            last[tp] = max([last[tp], *(r.offset + 1 for r in records)])
    return last


async def mirror_caught_up(settings: Settings, timeout_s: float = 600) -> float:
    """Seconds until the mirror's stored offsets are past the last event of each partition.

    Under exactly_once a partition's log ends in a transaction marker, which the mirror
    never stores an offset for: the target is one past each partition's last *record*."""
    consumer = AIOKafkaConsumer(
        enable_auto_commit=False, isolation_level="read_committed", **client_kwargs(settings)
    )
    await consumer.start()
    try:
        topic = settings.kafka_events_topic
        tps = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
        ends = await last_records_end(consumer, tps)
    finally:
        await consumer.stop()
    target = sum(ends.values())
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < timeout_s:
            stored = await conn.fetchval(
                "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
                "WHERE consumer = 'postgres-mirror' AND topic = $1",
                topic,
            )
            if stored >= target:
                return time.perf_counter() - started
            await asyncio.sleep(0.05)
        raise AssertionError(f"the mirror did not catch up within {timeout_s}s")
    finally:
        await conn.close()


@dataclass
class Round:
    """One round's throughputs, measured one after the other."""

    ceiling: float
    baseline: float
    burst: float
    mirror_s: float
    commands: int
    events_per_command: float
    bytes_per_event: float
    reseeks: int = 0

    @property
    def sustained(self) -> float:
        """Commands / (until the mirror had every event): the rate a steady load can have,
        the mirror's share of the worker's cores included (a burst leaves it behind)."""
        return self.commands / (self.commands / self.burst + self.mirror_s)


def measure_round(
    stack: Stack,
    worker: WorkerProcess,
    ceiling_app: Ceiling,
    escrows: int,
    profile: Path | None,
) -> Round:
    settings, secret = stack.settings, stack.secret()
    ceiling_rate = ceiling_app.burst(
        records_of(secret, interleaved(lifecycles(escrows, "ceil"))),
        profile and profile / "ceiling.txt",
    )
    pg_lives = [records_of(secret, life) for life in lifecycles(escrows, "pg")]
    pg_rate, pg_outcomes = asyncio.run(baseline(settings, pg_lives))
    assert pg_outcomes.get("accepted") == escrows * STEPS, pg_outcomes
    records = records_of(secret, interleaved(lifecycles(escrows, "bench")))
    assert worker.proc is not None
    with profiled(worker.proc.pid, profile and profile / "worker.txt"):
        rate, reader = asyncio.run(
            burst(settings, settings.kafka_commands_topic, settings.kafka_events_topic, records)
        )
    mirror_s = asyncio.run(mirror_caught_up(settings))
    return Round(
        ceiling_rate,
        pg_rate,
        rate,
        mirror_s,
        len(records),
        reader.records / len(records),
        reader.value_bytes / max(1, reader.records),
        reader.reseeks,
    )


def at_half_load(
    stack: Stack, worker: WorkerProcess, sustained: float, seconds: float, profile: Path | None
) -> tuple[Latencies, dict[str, float]]:
    """The open-loop run at half of ``sustained``; and the CPU each part used during it
    (in cores: 1.0 is one core busy the whole run)."""
    settings = stack.settings
    per_s = sustained / 2
    count = max(STEPS, int(per_s * seconds))
    lives = lifecycles((count + STEPS - 1) // STEPS, "lat")
    assert worker.proc is not None
    pids = stack_pids(worker)
    before = CpuSample.take(pids)
    with profiled(worker.proc.pid, profile and profile / "worker-latency.txt"):
        latency = asyncio.run(
            open_loop(
                settings,
                settings.kafka_commands_topic,
                settings.kafka_events_topic,
                records_of(stack.secret(), staggered(lives)),
                per_s,
            )
        )
    return latency, before.shares(CpuSample.take(pids))


def run(argv: Sequence[str] | None = None) -> Table:
    parser = argparse.ArgumentParser(
        prog="benchmarks.pipeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--escrows", type=int, default=1000, help="lifecycles per throughput run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="ceiling, baseline and pipeline measured this many times in turn; medians shown",
    )
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy profiles (raw collapsed stacks) of the ceiling's and the worker's "
        "throughput runs (the last round's) and of the worker's latency run into this directory",
    )
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch()
    table = Table(
        f"Pipeline: {args.escrows} escrows x {STEPS} commands, {args.rounds} rounds",
        command_line("benchmarks.pipeline", list(argv or [])),
        columns=("what", "figure", "ratio"),
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    stack = Stack.create(tmp, **bench_env())
    ceiling_app = Ceiling(stack.settings, tmp)
    rounds: list[Round] = []
    try:
        prepare(stack)
        activate_seller(stack, SELLER["id"])
        secret = stack.secret()
        settings = stack.settings
        worker = stack.worker("bench").start()
        worker.wait_healthy(READY_WAIT_S)
        worker.wait_processing(READY_WAIT_S)
        verify_kyc(stack, worker, [BUYER["id"], SELLER["id"]])
        asyncio.run(
            warm_up(
                settings,
                settings.kafka_commands_topic,
                settings.kafka_events_topic,
                records_of(secret, lifecycle(unique("warm"))),
            )
        )
        ceiling_app.start(records_of(secret, lifecycle(unique("warm"))))
        for r in range(args.rounds):
            last = r == args.rounds - 1
            rounds.append(
                measure_round(
                    stack, worker, ceiling_app, args.escrows, args.profile if last else None
                )
            )
        ceiling_app.stop()  # idle during the latency run, but not there at all is better
        sustained = statistics.median(x.sustained for x in rounds)
        latency, cpu = at_half_load(stack, worker, sustained, args.latency_seconds, args.profile)
        assert worker.stop() == 0, worker.log_tail()
    except BaseException:
        for w in stack.workers:
            print(f"--- {w.name}\n{w.log_tail(3000)}", file=sys.stderr)
        print(f"--- ceiling\n{ceiling_app.log_tail()}", file=sys.stderr)
        raise
    finally:
        ceiling_app.stop()
        cleanup(stack)
        shutil.rmtree(tmp, ignore_errors=True)

    def median(values: Iterable[float]) -> float:
        return statistics.median(values)

    ceiling_rate = median(x.ceiling for x in rounds)
    pg_rate = median(x.baseline for x in rounds)
    rate = median(x.burst for x in rounds)
    mirror_s = median(x.mirror_s for x in rounds)
    lat = latency.values
    table.add("ceiling: bare Faust agent, messages/s", f"{ceiling_rate:,.0f}", "")
    table.add(
        f"baseline: PostgreSQL transaction per command, {BASELINE_CONCURRENCY} concurrent, "
        "commands/s",
        f"{pg_rate:,.0f}",
        "",
    )
    table.add(
        "pipeline: escrow-stream worker, commands/s (send → event read)",
        f"{rate:,.0f}",
        f"{rate / ceiling_rate:.2f}x ceiling, {rate / pg_rate:.2f}x baseline",
    )
    table.add(
        "pipeline, sustained: commands/s until the PostgreSQL mirror has every event",
        f"{sustained:,.0f}",
        f"{sustained / ceiling_rate:.2f}x ceiling, {sustained / pg_rate:.2f}x "
        f"baseline (mirror done {mirror_s:.2f} s after the last event)",
    )
    table.add(
        f"latency p50 at {latency.rate:,.0f} commands/s "
        f"(50 % of the row above, {latency.seconds:.0f} s open loop)",
        ms(quantile(lat, 50)),
        "",
    )
    table.add("latency p99 at the same rate", ms(quantile(lat, 99)), f"max {ms(max(lat))}")
    table.add(
        "bytes per event (mean value size on the events topic)",
        f"{median(x.bytes_per_event for x in rounds):,.0f}",
        f"{median(x.events_per_command for x in rounds):.2f} events per command",
    )

    quarters = [lat[i * len(lat) // 4 : (i + 1) * len(lat) // 4] for i in range(4)]

    def each(values: Iterable[float]) -> str:
        return ", ".join(f"{v:,.0f}" for v in values)

    table.notes = [
        f"Figures are medians of {args.rounds} rounds, each measuring the ceiling, the "
        f"baseline and the pipeline in turn over {args.escrows * STEPS:,} commands; per round: "
        f"ceiling {each(x.ceiling for x in rounds)}; baseline "
        f"{each(x.baseline for x in rounds)}; pipeline {each(x.burst for x in rounds)}; "
        f"sustained {each(x.sustained for x in rounds)}.",
        f"Latency over {len(lat):,} commands, from each command's scheduled send time; the "
        f"open-loop producer was at most {ms(latency.behind_max)} behind its schedule. "
        f"By quarter of the schedule, p50 {', '.join(ms(quantile(q, 50)) for q in quarters)}; "
        f"p99 {', '.join(ms(quantile(q, 99)) for q in quarters)}.",
        cpu_note("the latency run", cpu),
        f"The events reader sought a stalled partition again {sum(x.reseeks for x in rounds)} "
        f"time(s) in the burst rounds and {latency.reseeks} in the latency run (after "
        f"{READER_STALL_S:.0f} s at one position below its end offset: an "
        "aiokafka read_uncommitted consumer stall on the transactional events topic; "
        "`Reader._unstall`).",
        "Ratios are of figures from this one run, on the same broker and database; the load "
        "generator and reader run on the same cores as the worker, the broker and PostgreSQL; "
        "the worker and the ceiling's worker are both up (one idle) during the rounds.",
        "Worker: KYC gating on, the PostgreSQL mirror in the process, the timeout timer at "
        "the default ESCROW_TIMEOUT_POLL_INTERVAL_MINUTES; payment effects off (the benchmark "
        "sends the provider's system commands itself).",
        "Baseline: per command, one transaction that locks the escrow row, inserts the "
        "idempotency row, runs the processor's decision code (handling.handle_command) with "
        "the same KYC and payout-account lookups, updates the snapshot (version check) and "
        "inserts the events and their outbox rows.",
    ]
    table.seconds = clock.seconds
    return table


def main() -> None:
    print(run(sys.argv[1:]).markdown())


if __name__ == "__main__":
    main()
