"""Faust's Kafka transport with three corrections: never commit over a message not yet
processed, never drop a fetched message after the last seek of a rebalance, and rewind
after a rebalance also the partitions that have nothing committed yet.

**1. Commits (faust-streaming issue #606).**

faust-streaming (0.15) decides what to commit in ``Consumer._new_offset`` from the offsets
its streams acknowledged.  When the first acknowledged offset is exactly one past the
committed offset, it takes the missing offset for a hole in the log (a transaction marker
or a compacted record) and commits over it — also when that offset is a real message that
is still being processed, or that the fetcher has not delivered again yet after a
rebalance reset its position (faust-streaming issue #606, open).  A crash after such a
commit loses the message: the SIGKILL fault test saw a command with no outcome at all.

The correction: a hole between the committed offset and the first acknowledged offset may
be committed over only when the fetcher has read past it (so a real message there would
have been delivered) and none of its offsets is a message delivered to a stream and not yet
acknowledged.  Otherwise nothing is committed for that partition this time; the next
commit, after the hole is processed, covers it.  This can only commit later, never earlier.

**2. The stall after "Worker ready".**  A rebalance in faust-streaming (0.15) ends, in
``Recovery.on_recovery_completed`` (and ``_resume_streams``), in this order:

1. resume the stream partitions (the fetcher may deliver their records from now on);
2. seek them to their committed offsets (``perform_seek``), awaited;
3. ``app.flow_control.resume()``, which also *clears* every stream buffer.

Step 2 is awaited, so the fetcher runs between 2 and 3: records it fetches from the
committed offsets are put into the agents' buffers, and step 3 throws them away.  Their
offsets are never fetched again (the fetch position is past them) and never acknowledged
(the committed offset stays behind them), so the worker says "Worker ready", keeps its
partitions, and processes nothing until it restarts — the kill -9 test's stall, seen with
all six command partitions fetched to their end, committed offsets unchanged and every
buffer empty.

The correction: resuming does not clear the stream buffers (:class:`FlowControl`).  That
clear is redundant everywhere else: revocation clears the buffers explicitly while flow is
suspended, and a stream skips any message stamped with an older consumer generation or
delivered while flow is suspended (faust's own check in ``Stream._py_aiter``), which are
the only stale messages a buffer can hold at a resume.  Messages fetched before step 2's
seek and kept are processed and then fetched again: a duplicate, which the processor
recognises by commandId (SPEC §3, rule 1).  The tables' changelog buffer is still cleared
on resume, as faust does.

**3. Partitions with nothing committed yet.**  Every rebalance ends by seeking the stream
partitions back to their committed offsets, so that records fetched and then discarded
during the rebalance (buffers cleared on revocation, records of an older generation the
stream skips) are fetched again.  A partition with nothing committed yet is not sought at
all (aiokafka's ``seek_to_committed`` skips offsets that are None or 0), so those records
are never fetched again; the first record processed afterwards is acknowledged, and with
no committed offset faust sees no hole and commits past everything before it.  Seen in the
two-worker SIGKILL test: a partition whose owner was killed before its first commit lost
its first 1,063 commands.  The correction: such partitions are sought to their first
offset (the ``earliest`` reset policy), as a partition with a committed offset is sought to
it.  Records processed before the rebalance are processed again: duplicates, as always.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, cast

import faust
from faust.streams import current_event
from faust.tables.manager import TableManager as FaustTableManager
from faust.transport.consumer import CONSUMER_PARTITIONS_REVOKED
from faust.transport.consumer import TransactionManager as FaustTransactionManager
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.transport.producer import ProducerBuffer as FaustProducerBuffer
from faust.types import TP
from faust.types.transports import TransportT
from mode import Service
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent, FlowControlQueue


def may_commit_over_hole(
    committed: int | None, first_acked: int, read_offset: int | None, in_flight: Iterable[int]
) -> bool:
    """Whether offsets ``committed .. first_acked - 1`` (not acknowledged) may be skipped."""
    if committed is None or first_acked <= committed:
        return True  # no hole
    if read_offset is None or read_offset < first_acked:
        return False  # the fetcher has not delivered the hole's offsets (again) yet
    return not any(committed <= offset < first_acked for offset in in_flight)


def to_restart(committed: Mapping[TP, int | None], is_changelog: Callable[[TP], bool]) -> list[TP]:
    """Correction 3: the stream partitions that ``seek_to_committed`` leaves where they are —
    nothing committed yet (None, or 0, which faust and aiokafka both read as "none")."""
    return sorted(
        (tp for tp, offset in committed.items() if not offset and not is_changelog(tp)),
        key=lambda tp: (tp.topic, tp.partition),
    )


def transactional_id(app_id: str, group: int, partition: int) -> str:
    """Faust's transactional.id of a partition of a co-partitioned group (under exactly_once
    one producer per id; a partition's offsets are committed in its id's transaction)."""
    return f"{app_id}-{group}-{partition}"


def send_transactional_id(
    app_id: str,
    source: TP | None,
    dest_topic: str,
    dest_partition: int | None,
    is_changelog: bool,
    group_for_topic: Callable[[str], int],
) -> str | None:
    """Correction 4: the transaction a record sent under exactly_once belongs to (its
    transactional.id, ``{app_id}-{group}-{partition}``), None for none.

    - Sent while a message is processed (``source``): that message's transaction, the one
      its offset is committed with (KIP-98's consume-transform-produce).  Faust picks the
      *destination* partition's instead, so an event for the 12-partition events topic went
      into a transaction that only a commit of that *events* partition's offsets ends.
    - A table's changelog record, sent by the changelog buffer's own task: the changelog
      partition's, the transaction of the source partition it is co-partitioned with.
    - Anything else (the timeout timer's commands, whose commandIds are deterministic): no
      transaction.  In one, it would wait for the next commit of that commands partition,
      which a read_committed consumer cannot trigger without first seeing it."""
    if source is not None:
        return transactional_id(app_id, group_for_topic(source.topic), source.partition)
    if is_changelog and dest_partition is not None:
        return transactional_id(app_id, group_for_topic(dest_topic), dest_partition)
    return None


def changelogs_committed_with(
    committed: Iterable[TP], pending: Iterable[TP], group_for_topic: Callable[[str], int]
) -> list[TP]:
    """exactly_once: the changelog partitions whose writes were committed with ``committed``
    source partitions: same copartitioned group, same partition number (one transactional.id).
    Faust looks the pending persisted offsets up by the *source* partition, where they are
    keyed by the *changelog* partition, so it never saves them."""
    ids = {(group_for_topic(tp.topic), tp.partition) for tp in committed}
    return sorted(
        (tp for tp in pending if (group_for_topic(tp.topic), tp.partition) in ids),
        key=lambda tp: (tp.topic, tp.partition),
    )


class CommitGate:
    """Correction 5: under exactly_once a transaction commits only between two commands.

    The command processor holds the gate while it handles one message, and acknowledges
    the message before it lets go; a commit takes the gate first.  So a transaction never
    holds the table write or the events of a command whose offset it does not commit —
    faust commits on a timer, concurrently with the agents, and a commit in the middle of a
    command committed half of it without its offset: after a crash the command was handled
    again and its events were in the log twice, for read_committed consumers too.  Under
    at_least_once the gate is open (nothing waits)."""

    def __init__(self, closed: Callable[[], bool]) -> None:
        self._closed = closed
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        if not self._closed():
            yield
            return
        async with self._lock:
            yield


class Redeliveries:
    """Correction 8 (exactly_once): a message handled a second time in one consumer
    generation is skipped, not handled again.

    Correction 2 keeps the records fetched before the end-of-rebalance seek; they are
    handled, then fetched again from the committed offset.  Under at_least_once the second
    handling re-emits the recorded outcome, a duplicate consumers dedupe.  Under
    exactly_once the first handling is in the open transaction of its partition, which
    commits with its offset (or aborts, and then the worker has crashed or the partition
    was revoked — a new generation, where nothing is skipped), so the second is only a
    duplicate in the committed log.  Only a handling that finished is remembered."""

    def __init__(self) -> None:
        self._generation: int | None = None
        self._last: dict[TP, int] = {}

    def seen(self, tp: TP, offset: int, generation: int | None) -> bool:
        """Whether ``offset`` of ``tp`` was already handled in this generation."""
        if generation != self._generation:
            return False
        last = self._last.get(tp)
        return last is not None and offset <= last

    def handled(self, tp: TP, offset: int, generation: int | None) -> None:
        if generation != self._generation:
            self._generation, self._last = generation, {}
        self._last[tp] = max(offset, self._last.get(tp, offset))


class ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the worker's ``fetch.max.wait.ms`` from the app
    (``KAFKA_FETCH_MAX_WAIT_MS``) instead of faust's fixed 1500 ms: a latency fix.

    aiokafka sends one fetch per broker at a time, and leaves out of it every partition
    whose last fetched records the streams have not taken yet.  So the fetch sent while
    the processor takes a batch of commands asks only for the other partitions; under
    exactly_once those include the events topic, where an open transaction means nothing
    is readable, and the broker holds the fetch for the whole wait.  New commands sat
    behind it: 1.4-1.6 s without processing, a p99 of 1.7 s at half load, and p50 ~1 s
    once the backlog chained (``benchmarks.pipeline``)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # read by AIOKafkaConsumer.start, when it creates its Fetcher
        consumer._fetch_max_wait_ms = cast(App, self.app).fetch_max_wait_ms
        return consumer


class Consumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @Service.transitions_to(CONSUMER_PARTITIONS_REVOKED)
    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Faust's revocation, except that under exactly_once the offsets acknowledged on
        the revoked partitions are forgotten only *after* the app's handler (correction 6).
        That handler waits for the streams and then commits and ends the transactions;
        faust forgot the acknowledgements first, so nothing was committed, the revoked
        transactions were abandoned (aborted by their next owner: the work done again) and
        the kept ones stayed open, to receive the same work a second time after the seek."""
        if not self.in_transaction:
            await super().on_partitions_revoked(revoked)
            return
        if self._active_partitions is not None:
            self._active_partitions.difference_update(revoked)
        self._paused_partitions.difference_update(revoked)
        try:
            await self._on_partitions_revoked(revoked)
        finally:
            for tp in revoked:
                self._gap.pop(tp, None)
                self._acked.pop(tp, None)
                self._acked_index.pop(tp, None)
                self._read_offset.pop(tp, None)
                self._committed_offset.pop(tp, None)

    async def force_commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """Correction 5: under exactly_once, commit only between two commands."""
        gate: CommitGate = self.app.commit_gate  # type: ignore[attr-defined]
        async with gate.held():
            committed: bool = await super().force_commit(
                topics, start_new_transaction=start_new_transaction
            )
            return committed

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        """exactly_once: ask the broker (ListOffsets; under read_committed that is the last
        stable offset) instead of faust's cached ``last_stable_offset``, which is None for
        every partition of a new assignment until its first fetch response.  Recovery turns
        None into -1 and then thinks a taken-over changelog partition needs nothing, or (with
        a persisted offset above -1) raises ConsistencyError."""
        if not self.in_transaction:
            return await super().highwaters(*partitions)
        thread: Any = self._thread
        aiokafka_consumer = thread._ensure_consumer()
        ends: Mapping[TP, int] = await thread.call_thread(
            aiokafka_consumer.end_offsets, list(partitions)
        )
        return ends

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets (``Consumer.perform_seek``), plus correction 3:
        stream partitions with nothing committed go back to their first offset."""
        committed = await self.seek_to_committed()
        restart = to_restart(committed, self._is_changelog_tp)
        if restart and self.app.conf.consumer_auto_offset_reset == "earliest":
            await self._thread.seek_to_beginning(*restart)
        self._read_offset.update(
            {
                tp: offset if offset is not None and offset >= 0 else None
                for tp, offset in committed.items()
            }
        )
        self._committed_offset.update(
            {tp: offset or None for tp, offset in committed.items() if offset is not None}
        )

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if acked:
            in_flight = [
                m.offset for m in list(self._unacked_messages) if m.tp == tp and not m.acked
            ]
            if not may_commit_over_hole(
                self._committed_offset[tp], min(acked), self._read_offset[tp], in_flight
            ):
                return None
        return super()._new_offset(tp)


class TransactionManager(FaustTransactionManager):
    """Faust's exactly_once transaction manager, with every send made while processing a
    message in that message's transaction, and the producer buffer (the tables' changelog
    writes) flushed into a transaction before its offsets are committed."""

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]
    ) -> None:
        """Correction 7: after every rebalance, one fresh producer per transactional.id of the
        new assignment, and none for any other.

        Faust stopped the producers of the revoked partitions only, and computed which those
        were with the *new* assignment's standby test: a partition revoked and now held as a
        standby kept its producer.  When the partition came back, that producer — fenced
        meanwhile by the other owner's — was reused, its sends failed with ProducerFenced
        and the processor crashed.  The producers of the partitions kept had their
        transaction left open across the rebalance.  Now all are stopped (the revocation
        committed and ended every transaction that held work) and those of the new
        assignment started, each fencing whatever an earlier owner left open."""
        producer: Any = self.producer
        start = sorted(self._tps_to_transactional_ids(assigned))
        for tid in list(producer._transaction_producers):  # a kept one too: maybe fenced
            await producer.stop_transaction(tid)
        if start:
            self.log.info("Starting %d transactional producers", len(start))
        for tid in start:
            await producer.begin_transaction(tid)
            if tid not in producer._transaction_producers:  # faust logged why
                raise RuntimeError(f"transactional producer {tid} did not start")

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> Any:
        p = self.consumer.key_partition(topic, key, partition)
        event = current_event()
        tid = send_transactional_id(
            self.app.conf.id,
            event.message.tp if event is not None else None,
            topic,
            p,
            topic in self.app.tables.changelog_topics,
            self.app.assignor.group_for_topic,
        )
        return await self.producer.send(
            topic, key, value, p, timestamp, headers, transactional_id=tid
        )

    async def commit(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        # at_least_once flushes the producer before committing (Consumer._commit_offsets);
        # exactly_once does not, so a table write still in the buffer would go into the
        # *next* transaction, or fail if none is begun (start_new_transaction=False at stop).
        await cast(ProducerBuffer, self.producer.buffer).drain()
        # At a stop, faust commits twice (the app's wait for the streams, then the
        # consumer's): the first ends the transactions, so a partition acknowledged in
        # between has none to commit its offsets in.  Begin it.
        producer: Any = self.producer
        group_for_topic = self.app.assignor.group_for_topic
        app_id = self.app.conf.id
        for tid in {
            transactional_id(app_id, group_for_topic(tp.topic), tp.partition) for tp in offsets
        }:
            transactional = producer._transaction_producers.get(tid)
            if transactional is not None and not transactional._txn_manager.is_in_transaction():
                await transactional.begin_transaction()
        return await super().commit(offsets, start_new_transaction=start_new_transaction)


class ProducerBuffer(FaustProducerBuffer):
    """Faust's producer buffer (the tables' changelog writes on their way to the producer),
    with :meth:`drain`.

    Faust's ``flush`` returns as soon as the queue is empty, while the last record taken
    from it may still be on its way to the producer, and also after 0.1 s without a send.
    A commit that relied on it could end the transaction before one of its changelog
    writes was in it (the record then fails, or lands in the next transaction)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._put = 0
        self._handed = 0
        self._handed_one = asyncio.Event()

    def put(self, fut: Any) -> None:
        super().put(fut)
        self._put += 1

    async def _send_pending(self, fut: Any) -> None:
        try:
            await super()._send_pending(fut)
        finally:  # handed over (or failed: then the buffer's task crashes, and drain raises)
            self._handed += 1
            self._handed_one.set()

    async def drain(self) -> None:
        """Wait until every record put before the call is handed to the producer."""
        if self.app is not None and self.app.conf.producer_threaded:
            await self.flush()
            return
        mark = self._put
        while self._handed < mark:
            if self.should_stop or self.crashed:
                raise RuntimeError("producer buffer stopped with records not sent")
            self._handed_one.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._handed_one.wait(), timeout=1.0)


class Producer(aiokafka_driver.Producer):
    """Faust's aiokafka producer with :class:`ProducerBuffer`, ending its transactions
    concurrently."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        buffer = ProducerBuffer(loop=self.loop, beacon=self.beacon)
        buffer.app = self.app
        self.buffer = buffer

    async def commit_transactions(
        self,
        tid_to_offset_map: Mapping[str, Mapping[TP, int]],
        group_id: str,
        start_new_transaction: bool = True,
    ) -> None:
        """Faust's, but the transactions end concurrently, not one after another.

        Each transactional.id is its own producer (one per partition of each topic group
        the worker consumes: 18 in ``benchmarks.pipeline``), and ending one is three round
        trips (AddOffsetsToTxn, TxnOffsetCommit, EndTxn).  One after another that took
        0.1-0.5 s here, all of it with the commit gate (correction 5) holding every command;
        together, 13-56 ms.  Each is still ended under its own lock, and the gate still
        spans the whole commit."""

        async def end(tid: str, offsets: Mapping[TP, int]) -> None:
            if tid not in self._transaction_producers:  # nor a lock (begin makes both)
                self.log.warning("Commit invoked for unknown transaction %s", tid)
                return
            async with self._trn_locks[tid]:
                transactional = self._transaction_producers[tid]
                await transactional.send_offsets_to_transaction(offsets, group_id)
                await transactional.commit_transaction()
                if start_new_transaction:
                    await transactional.begin_transaction()

        await asyncio.gather(*(end(tid, offsets) for tid, offsets in tid_to_offset_map.items()))


class TableManager(FaustTableManager):
    """exactly_once: save the changelog offsets committed with the source offsets."""

    def on_commit(self, offsets: Any) -> None:
        if not self.app.in_transaction:
            return super().on_commit(offsets)
        for tp in changelogs_committed_with(
            offsets, list(self._pending_persisted_offsets), self.app.assignor.group_for_topic
        ):
            self.on_commit_tp(tp)


class Transport(aiokafka_driver.Transport):
    Consumer = Consumer
    Producer = Producer
    TransactionManager = TransactionManager


class FlowControl(FlowControlEvent):
    """Faust's flow control, except that resuming clears only the queues ``cleared_on_resume``
    selects (correction 2): the tables' changelog buffer, never the agents' stream buffers."""

    def __init__(
        self, cleared_on_resume: Callable[[FlowControlQueue[Any]], bool], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.cleared_on_resume = cleared_on_resume

    def resume(self) -> None:
        self._suspend.clear()
        self._resume.set()
        for queue in list(self._queues):
            if self.cleared_on_resume(queue):
                queue.clear()


class App(faust.App):
    """``faust.App`` consuming through :class:`Transport`, with :class:`FlowControl` and
    the :class:`CommitGate` (closed under exactly_once), and closers run once every service
    of the app has stopped."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int = 1500, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The worker consumer's ``fetch.max.wait.ms`` (:class:`ConsumerThread`).
        self.fetch_max_wait_ms = fetch_max_wait_ms
        # asked at each use: ``in_transaction`` is known once the app runs in a worker
        self.commit_gate = CommitGate(lambda: self.in_transaction)
        #: Run in order at shutdown, after the agents, timers, web server and every other
        #: service have stopped (faust's ``on_before_shutdown`` comes before them: a pool
        #: closed there was still in use, e.g. by the outbox relay's last batch).
        self.closers: list[Callable[[], Awaitable[None]]] = []

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        for close in self.closers:
            await close()

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return FlowControl(self._is_changelog_queue, loop=self.loop)

    def _is_changelog_queue(self, queue: FlowControlQueue[Any]) -> bool:
        return queue is self.tables._changelog_queue  # type: ignore[attr-defined]
