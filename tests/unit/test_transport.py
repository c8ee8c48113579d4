"""The corrections of escrow_stream.transport: commits (#606), buffers kept on resume, and
exactly_once's transactions (which one a send belongs to, commits between commands)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP
from mode.utils.queues import FlowControlQueue

from escrow_stream.transport import (
    CommitGate,
    FlowControl,
    ProducerBuffer,
    Redeliveries,
    changelogs_committed_with,
    may_commit_over_hole,
    send_transactional_id,
)


@pytest.mark.parametrize(
    ("committed", "first_acked", "read_offset", "in_flight", "allowed"),
    [
        (None, 0, 0, [], True),  # nothing committed yet
        (40, 40, 40, [], True),  # no hole: the head is the next offset
        (40, 40, 45, [41], True),  # in-flight messages after the head do not matter here
        # faust would commit over 40 in each of these; the correction does not:
        (40, 41, 41, [40], False),  # 40 is still being processed (#606)
        (40, 41, 40, [], False),  # after a seek: 40 not delivered again yet, 41 acked early
        (40, 43, 41, [], False),  # the fetcher has not read past the hole
        # a real hole (transaction marker, compacted record): read past, nothing in flight
        (40, 41, 41, [], True),
        (40, 43, 50, [44, 45], True),
    ],
)
def test_a_hole_is_skipped_only_when_it_holds_no_message(
    committed: int | None,
    first_acked: int,
    read_offset: int | None,
    in_flight: list[int],
    allowed: bool,
) -> None:
    assert may_commit_over_hole(committed, first_acked, read_offset, in_flight) is allowed


def test_the_app_consumes_through_the_corrected_transport() -> None:
    from escrow_stream import transport
    from escrow_stream.app import create_app
    from escrow_stream.config import load_settings

    app = create_app(load_settings({"NODE_ENV": "test", "PAYMENTS_EFFECTS_ENABLED": "false"}))
    assert isinstance(app.transport, transport.Transport)
    assert app.transport.Consumer is transport.Consumer
    assert app.transport.TransactionManager is transport.TransactionManager
    assert isinstance(app.tables, transport.TableManager)
    assert isinstance(app.commit_gate, transport.CommitGate)  # type: ignore[attr-defined]
    assert isinstance(app.producer.buffer, transport.ProducerBuffer)
    assert isinstance(app.flow_control, transport.FlowControl)
    assert app.flow_control.cleared_on_resume(app.tables.changelog_queue)


def test_resuming_keeps_stream_buffers_and_clears_the_changelog_buffer() -> None:
    async def scenario() -> None:
        changelog: list[FlowControlQueue[str]] = []
        flow = FlowControl(lambda queue: queue in changelog)
        stream: FlowControlQueue[str] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        changelog.append(FlowControlQueue(flow_control=flow, clear_on_resume=True))
        flow.resume()
        # the fetcher delivers after the final seek, before the resume that ends recovery
        stream.put_nowait("command@13")
        changelog[0].put_nowait("changelog record")
        flow.resume()
        assert flow.is_active()
        assert stream.qsize() == 1 and await stream.get() == "command@13"
        assert changelog[0].qsize() == 0
        # revocation still empties every buffer, as faust does (flow suspended first)
        stream.put_nowait("command@14")
        flow.suspend()
        flow.clear()
        assert stream.qsize() == 0 and not flow.is_active()

    asyncio.run(scenario())


def test_stream_partitions_with_nothing_committed_are_rewound_after_a_rebalance() -> None:
    from escrow_stream.transport import to_restart

    commands = [TP("escrow-commands", p) for p in range(4)]
    changelog = TP("app-escrows-changelog", 0)
    committed = {
        commands[0]: 41,  # sought to 41 by faust itself
        commands[1]: None,  # never committed: faust leaves it where the fetcher was
        commands[2]: 0,  # "0" is read as nothing committed by faust and aiokafka alike
        commands[3]: 7,
        changelog: None,  # tables read their changelogs themselves: never touched here
    }
    restart = to_restart(committed, lambda tp: tp.topic.endswith("-changelog"))
    assert restart == [commands[1], commands[2]]


GROUPS = {"escrow-commands": 0, "app-escrows-changelog": 0, "escrow.events.v1": 1}


@pytest.mark.parametrize(
    ("source", "topic", "partition", "is_changelog", "tid"),
    [
        # handling commands:3, every send is in commands:3's transaction (faust: events-9's)
        (TP("escrow-commands", 3), "escrow.events.v1", 9, False, "app-0-3"),
        (TP("escrow-commands", 3), "escrow-commands.dlq", None, False, "app-0-3"),
        (TP("escrow.events.v1", 7), "escrow-commands", 1, False, "app-1-7"),
        # the changelog buffer's own task: its co-partitioned source partition's
        (None, "app-escrows-changelog", 3, True, "app-0-3"),
        # the timeout timer: outside any transaction
        (None, "escrow-commands", 2, False, None),
        (None, "app-escrows-changelog", None, True, None),
    ],
)
def test_a_send_is_in_its_source_messages_transaction(
    source: TP | None, topic: str, partition: int | None, is_changelog: bool, tid: str | None
) -> None:
    assert send_transactional_id("app", source, topic, partition, is_changelog, GROUPS.get) == tid


def test_the_changelog_offsets_saved_are_those_committed_with_their_source() -> None:
    committed = [TP("escrow-commands", 1), TP("escrow-commands", 4)]
    pending = [TP("app-escrows-changelog", p) for p in range(6)]
    saved = changelogs_committed_with(committed, pending, GROUPS.__getitem__)
    assert saved == [TP("app-escrows-changelog", 1), TP("app-escrows-changelog", 4)]


def test_a_commit_waits_for_the_command_being_handled_under_exactly_once() -> None:
    async def scenario(closed: bool) -> list[str]:
        gate = CommitGate(lambda: closed)
        order: list[str] = []
        handling = asyncio.Event()

        async def command() -> None:
            async with gate.held():
                handling.set()
                await asyncio.sleep(0.01)  # sends, table write
                order.append("command handled and acked")

        async def commit() -> None:
            await handling.wait()
            async with gate.held():
                order.append("commit")

        await asyncio.gather(command(), commit())
        return order

    assert asyncio.run(scenario(True)) == ["command handled and acked", "commit"]
    assert asyncio.run(scenario(False)) == ["commit", "command handled and acked"]


class _Channel:
    """Where the buffer hands a record: the producer's send, held for ``held`` until
    released."""

    def __init__(self, held: str) -> None:
        self.held = held
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.handed: list[str] = []

    async def publish_message(self, fut: Any, wait: bool) -> None:
        if fut.message.value == self.held:
            self.started.set()
            await self.release.wait()
        self.handed.append(fut.message.value)


def test_a_drained_buffer_has_handed_every_record_to_the_producer() -> None:
    async def scenario() -> None:
        buffer = ProducerBuffer()
        buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))  # type: ignore[assignment]
        channel = _Channel(held="c")
        await buffer.start()
        try:
            for value in ("a", "b", "c"):
                message = SimpleNamespace(channel=channel, value=value)
                buffer.put(SimpleNamespace(message=message))  # type: ignore[arg-type]
            await channel.started.wait()  # "c" taken from the queue, on its way
            await buffer.flush()  # faust's: the queue is empty, so it returns
            assert channel.handed == ["a", "b"]
            drain = asyncio.ensure_future(buffer.drain())
            await asyncio.sleep(0.01)
            assert not drain.done()
            channel.release.set()
            await asyncio.wait_for(drain, timeout=5)
            assert channel.handed == ["a", "b", "c"]
        finally:
            await buffer.stop()

    asyncio.run(scenario())


def test_a_message_handled_twice_in_one_generation_is_seen_as_a_redelivery() -> None:
    commands = TP("escrow-commands", 2)
    redeliveries = Redeliveries()
    assert not redeliveries.seen(commands, 40, 7)
    redeliveries.handled(commands, 40, 7)
    redeliveries.handled(commands, 41, 7)
    # the end-of-rebalance seek brings 40 and 41 again: handled already in generation 7
    assert redeliveries.seen(commands, 40, 7) and redeliveries.seen(commands, 41, 7)
    assert not redeliveries.seen(commands, 42, 7)
    assert not redeliveries.seen(TP("escrow-commands", 3), 40, 7)
    # a new generation: what was not committed was aborted with its transaction; all again
    assert not redeliveries.seen(commands, 40, 8)
    redeliveries.handled(commands, 39, 8)
    assert redeliveries.seen(commands, 39, 8) and not redeliveries.seen(commands, 40, 8)


def test_the_worker_consumer_waits_for_data_as_long_as_configured() -> None:
    """faust fixes ``fetch.max.wait.ms`` at 1500; the worker's comes from
    KAFKA_FETCH_MAX_WAIT_MS (a fetch held for an open transaction's partitions holds up
    every command behind it: ``transport.ConsumerThread``)."""
    from escrow_stream import transport
    from escrow_stream.app import create_app
    from escrow_stream.config import load_settings

    env = {"NODE_ENV": "test", "PAYMENTS_EFFECTS_ENABLED": "false"}
    assert load_settings(env).kafka_fetch_max_wait_ms == 50
    app = create_app(load_settings({**env, "KAFKA_FETCH_MAX_WAIT_MS": "120"}))

    thread = app.consumer._thread
    assert isinstance(thread, transport.ConsumerThread)

    async def created() -> Any:
        consumer = thread._create_worker_consumer(app.transport)
        try:  # what AIOKafkaConsumer.start gives the Fetcher it creates
            return consumer._fetch_max_wait_ms
        finally:
            await consumer.stop()  # never started: nothing was connected

    try:
        assert asyncio.run(created()) == 120
    finally:
        thread.thread_loop.close()  # the thread never ran to close it


def test_the_transactions_of_a_commit_end_concurrently() -> None:
    """Every transaction's offsets are sent before any of them is answered (one after
    another, the first would wait forever here), each is committed, and a new one begun
    only when asked."""
    from escrow_stream.transport import Producer

    tids = [f"app-{group}-{p}" for group in (0, 1) for p in range(3)]
    calls: list[tuple[str, str]] = []
    all_asked: asyncio.Event

    class Transactional:
        def __init__(self, tid: str) -> None:
            self.tid = tid

        async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
            calls.append((self.tid, f"offsets {dict(offsets)} {group_id}"))
            if sum(1 for _, what in calls if what.startswith("offsets")) == len(tids):
                all_asked.set()
            await all_asked.wait()

        async def commit_transaction(self) -> None:
            calls.append((self.tid, "commit"))

        async def begin_transaction(self) -> None:
            calls.append((self.tid, "begin"))

    async def commit(start_new_transaction: bool) -> None:
        nonlocal all_asked
        all_asked = asyncio.Event()
        producer = SimpleNamespace(
            _trn_locks={tid: asyncio.Lock() for tid in tids},
            _transaction_producers={tid: Transactional(tid) for tid in tids},
            log=SimpleNamespace(warning=lambda *args: calls.append(("?", args[0] % args[1:]))),
        )
        offsets = {tid: {TP("t", i): 10 * i} for i, tid in enumerate(tids)}
        offsets["app-9-9"] = {TP("u", 9): 1}  # no producer: warned about, nothing else
        await asyncio.wait_for(
            Producer.commit_transactions(producer, offsets, "app", start_new_transaction),  # type: ignore[arg-type]
            timeout=10,
        )

    asyncio.run(commit(start_new_transaction=True))
    assert sorted(what for tid, what in calls if tid == tids[2]) == [
        "begin",
        "commit",
        f"offsets {{{TP('t', 2)!r}: 20}} app",
    ]
    assert sum(1 for _, what in calls if what == "commit") == len(tids)
    assert ("?", "Commit invoked for unknown transaction app-9-9") in calls
    calls.clear()
    asyncio.run(commit(start_new_transaction=False))
    assert [what for _, what in calls if what in ("commit", "begin")] == ["commit"] * len(tids)
