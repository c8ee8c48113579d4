"""The timeout processor: a Faust timer that sends the timeout commands that are due.

Every ``ESCROW_TIMEOUT_POLL_INTERVAL_MINUTES`` each worker takes from its deadline index
(``escrow_stream.tables.deadlines``) the escrows of the partitions it actively owns whose
deadline has passed, re-reads each from the table (the index may be stale; the table is the
truth), asks the domain which timeout command is due (``timeout_command_for``) and sends it,
signed, to ``escrow-commands``.  A tick costs O(due escrows), not O(all escrows).  The
commandId is derived from escrowId + status + version, so two timers (or two ticks before
the first command is processed) produce the same command and the escrow applies it once;
the processor re-checks the deadline when it decides.

Per tick (:meth:`TimeoutScanner.tick`):

1. Read the owner's key: the consumer generation and the table partitions this worker
   actively owns.  Standby partitions are not ours: a RocksDB table iterates only its
   active partitions, and the key names only those.
2. While the worker rebalances or recovers its tables, skip the tick: the processor is
   paused too, and whatever is due is still due at the next tick.
3. If the index was last built for another key, rebuild it from the table, a chunk of
   escrows at a time with the event loop free in between (the processor's writes meanwhile
   win over what the rebuild read: ``tables/deadlines.py``).  After each pause the owner is
   asked again; a rebalance under way stops the rebuild and the tick.
4. Take what has come due from the index; re-read each of those escrows from the table and
   build its command.  Nothing yields from here to the end of the collection, so the table
   does not change under it; then the commands are sent.

Why a check per tick and not Faust's callbacks: a changelog restore writes the table without
the processor, and Faust restores only during a rebalance, which always moves the consumer
generation; the key therefore changes whenever the table may have changed behind the
processor's back, a partition lost and regained between two ticks included (which the set of
partitions alone would miss).  The check costs two attribute reads and a set of at most six
partitions.  ``on_partitions_assigned`` fires before the restore, too early; the table's
recover callback fires at the right time but would put an O(all escrows) decode on the
recovery path, before processing resumes.  The consumer runs in its own thread and may
begin a rebalance at any time; it marks the app rebalancing before any partition is
revoked on the event loop, and the generation moves with the new assignment, so asking the
owner after each pause of the rebuild is enough.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import faust
from faust.types import TableT

from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.domain import Command, DomainSettings, timeout_command_for
from escrow_stream.domain.timeouts import Deadlines, holds_card_funds_past
from escrow_stream.liveness import processing_ready
from escrow_stream.messages import encode_command, signed_headers
from escrow_stream.metrics import STRIPE_HOLDS_PAST_WARNING, TIMEOUT_COMMANDS, TIMEOUTS_OVERDUE
from escrow_stream.tables import deadlines
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables.deadlines import DeadlineIndex

log = logging.getLogger(__name__)

#: Escrows a rebuild of the deadline index reads between two turns of the event loop: each
#: is a snapshot to decode, ~0.1 ms on an idle core, so the processor waits ~15 ms at most.
REBUILD_CHUNK = 128


def due_timeouts(
    values: Iterable[bytes],
    now: datetime,
    rules: DomainSettings,
    hold_warn_days: int | None = None,
) -> list[Command]:
    """The timeout commands due at ``now`` among the stored escrow snapshots; with
    ``hold_warn_days``, also sets the gauge of STRIPE escrows holding funds past that many
    days.  A scan of them all: the timer uses the deadline index instead."""
    due: list[Command] = []
    past_warning = 0
    for value in values:
        escrow = escrow_table.load(value)
        if escrow is None:
            continue
        command = timeout_command_for(escrow, now, rules)
        if command is not None:
            due.append(command)
        if hold_warn_days is not None and holds_card_funds_past(escrow, now, hold_warn_days):
            past_warning += 1
    if hold_warn_days is not None:
        STRIPE_HOLDS_PAST_WARNING.set(past_warning)
    return due


class Ownership(Protocol):
    """Which escrows are this worker's to time out."""

    def key(self) -> Hashable:
        """Changes whenever the table may have been written other than by the processor."""
        ...

    def ready(self) -> bool:
        """The owned partitions are assigned and their tables recovered."""
        ...


class ActivePartitions:
    """Step 1 for a Faust worker: (consumer generation, the table's active partitions)."""

    def __init__(self, app: faust.App, table: TableT[str, Any]) -> None:
        self._app = app
        self._table = table

    def key(self) -> Hashable:
        topic = self._table.changelog_topic.get_topic_name()
        actives = self._app.assignor.assigned_actives()
        return (
            self._app.consumer_generation_id,
            frozenset(tp.partition for tp in actives if tp.topic == topic),
        )

    def ready(self) -> bool:
        return processing_ready(self._app)


@dataclass(frozen=True)
class Tick:
    """What one tick found: the commands to send and what it cost."""

    commands: list[Command]
    #: STRIPE escrows holding funds past the warning (``escrow_stripe_holds_past_warning``).
    holds_past_warning: int
    #: Escrows read from the table for the index's due entries.
    read: int
    #: Escrows read to rebuild the index at this tick, or None when it was not rebuilt.
    rebuilt_from: int | None
    #: Escrows in the index (those with a deadline) after the tick.
    indexed: int


class TimeoutScanner:
    """Steps 1-4 of the module docstring over `escrows` (escrowId → stored snapshot)."""

    def __init__(
        self,
        escrows: Mapping[str, Any],
        index: DeadlineIndex,
        rules: DomainSettings,
        ownership: Ownership,
    ) -> None:
        self._escrows = escrows
        self._index = index
        self._rules = rules
        self._ownership = ownership

    async def tick(self, now: datetime) -> Tick | None:
        """The timeout commands due at `now`; None when the tick is skipped (step 2, or a
        rebalance began during the rebuild)."""
        key = self._ownership.key()
        if not self._ownership.ready():
            return None
        rebuilt_from = None
        if self._index.built_for != key:
            rebuilt_from = await self._rebuild(key)
            if rebuilt_from is None:
                return None
        # From here to the end nothing yields: the table does not change under the tick.
        commands: list[Command] = []
        candidates = self._index.advance(now)
        for escrow_id in candidates:
            escrow = escrow_table.load(self._escrows.get(escrow_id))
            if escrow is None:
                self._index.discard(escrow_id)
                continue
            self._index.note(escrow)  # repairs a stale entry; a current one keeps its place
            command = timeout_command_for(escrow, now, self._rules)
            if command is not None:
                commands.append(command)
        return Tick(
            commands,
            self._index.past_warning,
            len(candidates),
            rebuilt_from,
            len(self._index),
        )

    async def _rebuild(self, key: Hashable) -> int | None:
        """Step 3: the index from every escrow of the owned partitions, ``REBUILD_CHUNK``
        at a time with the event loop free in between; how many were read, or None when the
        ownership changed meanwhile (the next tick starts again)."""
        started = time.perf_counter()
        self._index.begin_rebuild()
        escrow_ids = list(self._escrows.keys())
        read: dict[str, Deadlines] = {}
        for start in range(0, len(escrow_ids), REBUILD_CHUNK):
            await asyncio.sleep(0)  # the processor's writes meanwhile are noted in the index
            if not self._ownership.ready() or self._ownership.key() != key:
                self._index.abort_rebuild()
                log.info("timeout processor: deadline index rebuild stopped by a rebalance")
                return None
            for escrow_id in escrow_ids[start : start + REBUILD_CHUNK]:
                escrow = escrow_table.load(self._escrows.get(escrow_id))
                if escrow is not None:
                    read[escrow_id] = self._index.deadlines_of(escrow)
        self._index.finish_rebuild(read, key)
        log.info(
            "timeout processor: deadline index rebuilt for %s from %d escrow(s), %d with a "
            "deadline, in %.0f ms",
            key,
            len(escrow_ids),
            len(self._index),
            (time.perf_counter() - started) * 1000,
        )
        return len(escrow_ids)


def register(
    app: faust.App,
    settings: Settings,
    clock: Clock,
    commands_topic: faust.TopicT,
    escrows: TableT[str, Any],
    rules: DomainSettings,
) -> None:
    """The timer, and the deadline index the processor's writes to `escrows` keep."""
    secret = settings.internal_command_secret.get_secret_value()
    interval_s = settings.escrow_timeout_poll_interval_minutes * 60.0
    index = deadlines.attach(escrows, DeadlineIndex(rules, settings.stripe_hold_warn_days))
    scanner = TimeoutScanner(escrows, index, rules, ActivePartitions(app, escrows))

    @app.timer(interval=interval_s, on_leader=False, name="escrow-timeouts")  # type: ignore[untyped-decorator]
    async def send_due_timeouts() -> None:
        # Collect first: sending yields to the loop, and the table may change meanwhile.
        tick = await scanner.tick(clock())
        if tick is None:
            log.debug("timeout tick skipped: rebalancing or recovering")
            return
        log.debug(
            "timeout tick: %d due, %d escrow(s) read, %d indexed",
            len(tick.commands),
            tick.read,
            tick.indexed,
        )
        STRIPE_HOLDS_PAST_WARNING.set(tick.holds_past_warning)
        TIMEOUTS_OVERDUE.set(len(tick.commands))  # not terminal past a deadline, this tick
        for command in tick.commands:
            body = encode_command(command)
            await commands_topic.send(
                key=command.escrow_id.encode(),
                value=body,
                headers=signed_headers(command, body, secret),
            )
            TIMEOUT_COMMANDS.labels(command.type).inc()
        if tick.commands:
            log.info("timeout processor sent %d command(s)", len(tick.commands))
