"""Liveness of the command processor: lag, progress, and a stall that ``/health`` reports.

A worker that has joined the group and says "Worker ready" can still move nothing (the
stall of ``tests/chaos/test_kill9.py``, README "A worker that looks healthy").  So each
worker watches its own command partitions, every ``CHECK_INTERVAL_S``:

1. For each assigned ``escrow-commands`` partition, the end offset is asked from the broker
   and compared with the group's committed offset: that is the partition's lag, as Kafka's
   tools count it, published as ``escrow_consumer_lag{topic,partition}``.  A worker whose
   commits no longer advance has lag too (after a crash it would redo everything since).
   Under ``exactly_once`` offsets that hold only transaction markers are not lag: a
   partition whose fetch position has reached the end offset with no message in flight has
   lag 0 (a record fetched and dropped there would go unseen; ``at_least_once`` has no
   markers, so nothing is excused).
2. A partition with lag and no processed message since the last check starts (or keeps)
   waiting; a processed message or zero lag resets it.  While the worker is rebalancing or
   recovering its tables no clock runs: restoring a large table is not a stall.
3. A partition waiting for ``STALL_TIMEOUT_S`` makes the worker *stalled*: ``/health``
   answers 503 so the orchestrator restarts it, and the consumer's state is logged once
   (assignment, paused and active partitions, fetch positions, flow control, stream
   buffers) so the cause can be read afterwards.

``escrow_processor_last_progress_timestamp`` is the wall time of the last processed command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import faust

from escrow_stream.metrics import CONSUMER_LAG, LAST_PROGRESS, STALLED

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0
#: Bound on one broker round trip of a check (end offsets, fetch position).
CHECK_CALL_TIMEOUT_S = 10.0


@dataclass
class ProgressMonitor:
    """Steps 2-3 of the module docstring, with time injected (``monotonic`` seconds)."""

    topic: str
    stall_timeout_s: float
    #: exactly_once: offsets holding only transaction markers are not lag (step 1)
    transactional: bool = False
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    #: next offset to process, per partition, as seen by the processor
    next_offset: dict[int, int] = field(default_factory=dict)
    #: since when a partition has had lag with no progress (monotonic seconds)
    waiting_since: dict[int, float] = field(default_factory=dict)
    _progressed: set[int] = field(default_factory=set)
    stalled_partitions: frozenset[int] = frozenset()

    def processed(self, partition: int, offset: int) -> None:
        """The processor finished the message at ``offset``."""
        self.next_offset[partition] = offset + 1
        self._progressed.add(partition)
        LAST_PROGRESS.set(self.wall())

    def assigned(self, partitions: Iterable[int]) -> None:
        """A new assignment: forget what other owners did, start no clock yet."""
        keep = set(partitions)
        for partition in list(self.next_offset):
            if partition not in keep:
                del self.next_offset[partition]
        for key in list(CONSUMER_LAG._metrics):  # labels of partitions no longer ours
            if key[0] == self.topic and int(key[1]) not in keep:
                CONSUMER_LAG.remove(*key)
        self.pause()

    def pause(self) -> None:
        """Rebalancing or recovering: no partition is waiting."""
        self.waiting_since.clear()
        self._progressed.clear()
        self.stalled_partitions = frozenset()
        STALLED.set(0)

    def observe(self, lags: Mapping[int, int]) -> frozenset[int]:
        """Record one check's lags; returns the partitions newly found stalled."""
        now = self.monotonic()
        for partition, lag in lags.items():
            CONSUMER_LAG.labels(self.topic, str(partition)).set(lag)
            if lag <= 0 or partition in self._progressed:
                self.waiting_since.pop(partition, None)
            else:
                self.waiting_since.setdefault(partition, now)
        for partition in list(self.waiting_since):
            if partition not in lags:
                del self.waiting_since[partition]
        self._progressed.clear()
        stalled = frozenset(
            p for p, since in self.waiting_since.items() if now - since >= self.stall_timeout_s
        )
        newly = stalled - self.stalled_partitions
        self.stalled_partitions = stalled
        STALLED.set(1 if stalled else 0)
        return newly

    @property
    def stalled(self) -> bool:
        return bool(self.stalled_partitions)


def register(app: faust.App, monitor: ProgressMonitor) -> None:
    """Step 1 as a Faust timer on every worker, feeding ``monitor``."""
    seen_generation = -1

    @app.timer(CHECK_INTERVAL_S, name="processor-liveness")  # type: ignore[untyped-decorator]
    async def check_progress() -> None:
        nonlocal seen_generation
        generation = app.consumer_generation_id
        if generation != seen_generation:
            seen_generation = generation
            monitor.assigned(tp.partition for tp in _command_tps(app, monitor.topic))
        if not processing_ready(app):
            monitor.pause()
            return
        try:
            lags = await asyncio.wait_for(_lags(app, monitor), CHECK_CALL_TIMEOUT_S)
        except Exception as exc:  # the check must never take the worker down
            log.warning("liveness: could not measure consumer lag: %r", exc)
            return
        if generation != app.consumer_generation_id:
            return  # a rebalance happened while we were asking
        newly = monitor.observe(lags)
        if newly:
            log.error(
                "processor stalled: partitions %s of %s have lag and no progress for %.0fs; "
                "consumer state: %s",
                sorted(newly),
                monitor.topic,
                monitor.stall_timeout_s,
                consumer_state(app, monitor),
            )


def processing_ready(app: faust.App) -> bool:
    """Joined the group (an assignment, possibly empty), not rebalancing, tables recovered."""
    return (
        app.consumer_generation_id > 0
        and not app.rebalancing
        and not app.in_recovery
        and _recovered(app)
    )


def _command_tps(app: faust.App, topic: str) -> list[Any]:
    try:
        assignment = app.consumer.assignment()
    except Exception:  # consumer not started yet
        return []
    return sorted((tp for tp in assignment if tp.topic == topic), key=lambda tp: tp.partition)


def _recovered(app: faust.App) -> bool:
    recovery = getattr(app.tables, "_recovery", None)
    completed = getattr(recovery, "completed", None)
    return completed is None or bool(completed.is_set())


async def _lags(app: faust.App, monitor: ProgressMonitor) -> dict[int, int]:
    tps = _command_tps(app, monitor.topic)
    if not tps:
        return {}
    consumer: Any = app.consumer
    ends = await consumer.highwaters(*tps)
    lags: dict[int, int] = {}
    for tp in tps:
        end = ends.get(tp)
        if end is None:
            continue
        lag = max(0, end - (consumer._committed_offset.get(tp) or 0))
        if lag and monitor.transactional and not _in_flight(consumer, tp):
            fetch_position = await consumer._thread.position(tp)
            if fetch_position is not None and fetch_position >= end:
                lag = 0  # only transaction markers left
        lags[tp.partition] = lag
    return lags


def _in_flight(consumer: Any, tp: Any) -> bool:
    return any(m.tp == tp and not m.acked for m in list(consumer._unacked_messages))


def consumer_state(app: faust.App, monitor: ProgressMonitor) -> dict[str, Any]:
    """What a stall diagnosis needs, read from Faust's and aiokafka's consumer (best effort)."""
    consumer: Any = app.consumer
    topic = monitor.topic
    state: dict[str, Any] = {"processed_up_to": dict(monitor.next_offset)}

    def tps(values: Any) -> list[str]:
        return sorted(f"{tp.topic}:{tp.partition}" for tp in (values or ()))

    def put(name: str, read: Callable[[], Any]) -> None:
        try:
            state[name] = read()
        except Exception as exc:
            state[name] = f"unavailable: {exc!r}"

    put("generation", lambda: app.consumer_generation_id)
    put("rebalancing", lambda: app.rebalancing)
    put("in_recovery", lambda: app.in_recovery)
    put("recovery_completed", lambda: _recovered(app))
    put("flow_active", lambda: consumer.flow_active)
    put("flow_control_active", lambda: app.flow_control.is_active())
    put("assignment", lambda: tps(consumer.assignment()))
    put("faust_active", lambda: tps(consumer._active_partitions))
    put("faust_paused", lambda: tps(consumer._paused_partitions))
    put("faust_buffered", lambda: tps(consumer._buffered_partitions))
    put("faust_committed", lambda: _offsets(consumer._committed_offset, topic))
    put("faust_read", lambda: _offsets(consumer._read_offset, topic))
    put("unacked", lambda: len(list(consumer._unacked_messages)))
    put("fetcher_state", lambda: str(app._fetcher.state))
    put(
        "faust_acked",
        lambda: {
            tp.partition: sorted(v)[:5]
            for tp, v in list(consumer._acked.items())
            if tp.topic == topic
        },
    )
    put("aiokafka", lambda: _aiokafka_state(consumer, topic))
    put("aiokafka_buffered", lambda: tps(consumer._thread._consumer._fetcher._records))
    put("stream_buffers", lambda: _stream_buffers(app))
    return state


def _offsets(offsets: Mapping[Any, Any], topic: str) -> dict[int, Any]:
    return {tp.partition: v for tp, v in list(offsets.items()) if tp.topic == topic}


def _aiokafka_state(consumer: Any, topic: str) -> dict[int, str]:
    aio = consumer._thread._consumer
    assignment = aio._subscription.subscription.assignment
    out: dict[int, str] = {}
    for tp in assignment.tps:
        if tp.topic != topic:
            continue
        s = assignment.state_value(tp)
        position = s.position if s.has_valid_position else None
        out[tp.partition] = f"paused={s.paused} position={position} highwater={s.highwater}"
    return out


def _stream_buffers(app: faust.App) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, agent in app.agents.items():
        queue: Any = getattr(agent.channel, "queue", None)
        if queue is not None:
            out[name] = {
                "size": queue.qsize(),
                "pending_pressure_drop": len(queue._pending_pressure_drop_callbacks),
            }
    return out
