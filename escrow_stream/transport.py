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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from faust.types.transports import TransportT
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


class Consumer(aiokafka_driver.Consumer):
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


class Transport(aiokafka_driver.Transport):
    Consumer = Consumer


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
    """``faust.App`` consuming through :class:`Transport`, with :class:`FlowControl`."""

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return FlowControl(self._is_changelog_queue, loop=self.loop)

    def _is_changelog_queue(self, queue: FlowControlQueue[Any]) -> bool:
        return queue is self.tables._changelog_queue  # type: ignore[attr-defined]
