"""The deadline index: escrowId → its deadlines, in time order, derived from the ``escrows``
table and kept with it, so the timeout processor looks only at escrows whose time has come.

It lives in the worker's memory, not in Kafka: it is a function of the table's values
(``domain.timeouts.deadlines_of``), so it is rebuilt from the table, never restored.

1. **Written with the state.** The command processor calls :func:`written` right after it
   writes an escrow's new state to the table (``agents/processor.py``, ``_apply``).
2. **Rebuilt with ownership.** A changelog restore writes the table without the processor,
   so the timeout processor rebuilds the index from the table whenever the partitions it
   actively owns change (``agents/timeouts.py`` says when).  It reads the table in parts,
   letting the processor run in between (:meth:`DeadlineIndex.begin_rebuild`, then
   :meth:`DeadlineIndex.finish_rebuild`): the escrows written meanwhile keep their deadlines
   as written (step 1), which are newer than what the rebuild may have read.
3. **Advanced per tick.** :meth:`DeadlineIndex.advance` moves what has come due out of the
   heaps: O(k log n) for k entries due, nothing for the escrows still waiting.

Each heap holds (time, escrowId) with lazy deletion: a change of an escrow's deadline pushes
a new entry and leaves the old one, which is dropped when it reaches the top and no longer
matches the escrow's current deadline.  The heaps are rebuilt from the live deadlines (O(n))
when they hold more than four entries per indexed escrow (at most two are live), so they
stay within that bound (or ``HEAP_COMPACT_MIN``) and a rebuild is paid for by as many writes.
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from escrow_stream.domain import DomainSettings, Escrow
from escrow_stream.domain.timeouts import NO_DEADLINES, Deadlines, deadlines_of

#: Below this many entries a heap is never compacted (rebuilding it would cost more).
HEAP_COMPACT_MIN = 1024

_Heap = list[tuple[datetime, str]]


class DeadlineIndex:
    """The deadlines of one worker's escrows: which timeouts are due, which STRIPE holds
    are past the warning.  Escrows with no deadline are not kept."""

    def __init__(self, rules: DomainSettings, hold_warn_days: int | None = None) -> None:
        self._rules = rules
        self._hold_warn_days = hold_warn_days
        self._deadlines: dict[str, Deadlines] = {}
        self._timeouts: _Heap = []
        self._warnings: _Heap = []
        #: Timeout passed at the last ``advance``, in the order they came due (a dict as an
        #: ordered set); an escrow stays until its deadline changes or it is discarded.
        self._due: dict[str, None] = {}
        self._past_warning: set[str] = set()
        #: What the index was last rebuilt for (the owner's key); None: not built since.
        self.built_for: Any = None
        #: The escrows written since ``begin_rebuild`` while a rebuild is under way.
        self._written_in_rebuild: set[str] | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def deadlines(self, escrow_id: str) -> Deadlines:
        return self._deadlines.get(escrow_id, NO_DEADLINES)

    def deadlines_of(self, escrow: Escrow) -> Deadlines:
        return deadlines_of(escrow, self._rules, self._hold_warn_days)

    def note(self, escrow: Escrow) -> None:
        """`escrow`'s state as just written."""
        self.put(escrow.escrow_id, self.deadlines_of(escrow))

    def put(self, escrow_id: str, deadlines: Deadlines) -> None:
        """`escrow_id`'s deadlines are now `deadlines`; an unchanged one keeps its place
        (due stays due, past the warning stays so)."""
        if self._written_in_rebuild is not None:
            self._written_in_rebuild.add(escrow_id)
        old = self._deadlines.get(escrow_id, NO_DEADLINES)
        if deadlines == old:
            return
        if deadlines == NO_DEADLINES:
            del self._deadlines[escrow_id]
        else:
            self._deadlines[escrow_id] = deadlines
        if deadlines.timeout_at != old.timeout_at:
            self._due.pop(escrow_id, None)
            if deadlines.timeout_at is not None:
                heapq.heappush(self._timeouts, (deadlines.timeout_at, escrow_id))
        if deadlines.hold_warning_after != old.hold_warning_after:
            self._past_warning.discard(escrow_id)
            if deadlines.hold_warning_after is not None:
                heapq.heappush(self._warnings, (deadlines.hold_warning_after, escrow_id))
        self._maybe_compact()

    def discard(self, escrow_id: str) -> None:
        """`escrow_id` is no longer in the table."""
        self.put(escrow_id, NO_DEADLINES)

    def begin_rebuild(self) -> None:
        """Step 2 begins: the table is read from now on, in parts; what is written meanwhile
        is noted here as usual, and wins over what the rebuild read (it is newer)."""
        self._written_in_rebuild = set()

    def finish_rebuild(self, read: Mapping[str, Deadlines], built_for: Any) -> None:
        """Replace everything with `read` (every escrow of the table, read since
        ``begin_rebuild``), but for the escrows written since, whose deadlines as written
        are kept; the index is built for `built_for`."""
        written = self._written_in_rebuild or set()
        self._written_in_rebuild = None
        rebuilt = {e: d for e, d in read.items() if d != NO_DEADLINES and e not in written}
        for escrow_id in written:
            if escrow_id in self._deadlines:
                rebuilt[escrow_id] = self._deadlines[escrow_id]
        self._deadlines = rebuilt
        self._due = {}
        self._past_warning = set()
        self._reheap()
        self.built_for = built_for

    def abort_rebuild(self) -> None:
        """The rebuild stopped half-way (ownership changed): to be rebuilt again."""
        self._written_in_rebuild = None
        self.built_for = None

    def advance(self, now: datetime) -> list[str]:
        """Take in what has come due by `now`: the escrows whose timeout is due (at or after
        their deadline), and those that have just passed the hold warning (strictly after
        it); the escrows to look at now."""
        newly_past_warning: list[str] = []
        for escrow_id in self._pop_current(self._timeouts, now, 0, inclusive=True):
            self._due[escrow_id] = None
        for escrow_id in self._pop_current(self._warnings, now, 1, inclusive=False):
            if escrow_id not in self._past_warning:
                self._past_warning.add(escrow_id)
                newly_past_warning.append(escrow_id)
        due = list(self._due)
        return due + [e for e in newly_past_warning if e not in self._due]

    @property
    def due(self) -> list[str]:
        """The escrows whose timeout was due at the last ``advance``."""
        return list(self._due)

    @property
    def heap_entries(self) -> int:
        """Entries in the heaps, stale ones included (bounded: see the module docstring)."""
        return len(self._timeouts) + len(self._warnings)

    @property
    def past_warning(self) -> int:
        """How many STRIPE holds were past the warning at the last ``advance``."""
        return len(self._past_warning)

    def _pop_current(self, heap: _Heap, now: datetime, field: int, inclusive: bool) -> list[str]:
        """Pop the entries at or before (`inclusive`) or before `now`; those that still
        match their escrow's deadline (`field` of its ``Deadlines``)."""
        current: list[str] = []
        while heap and (heap[0][0] <= now if inclusive else heap[0][0] < now):
            at, escrow_id = heapq.heappop(heap)
            if self.deadlines(escrow_id)[field] == at:
                current.append(escrow_id)
        return current

    def _maybe_compact(self) -> None:
        if self.heap_entries > max(HEAP_COMPACT_MIN, 4 * len(self._deadlines)):
            self._reheap()

    def _reheap(self) -> None:
        """The heaps from the current deadlines alone (O(n)): stale entries dropped.  What
        was taken in by ``advance`` stays in ``_due`` / ``_past_warning``, not in a heap."""
        self._timeouts = [
            (d.timeout_at, e)
            for e, d in self._deadlines.items()
            if d.timeout_at is not None and e not in self._due
        ]
        self._warnings = [
            (d.hold_warning_after, e)
            for e, d in self._deadlines.items()
            if d.hold_warning_after is not None and e not in self._past_warning
        ]
        heapq.heapify(self._timeouts)
        heapq.heapify(self._warnings)


#: The index each ``escrows`` table feeds, by the table's identity (the processor finds it
#: through its table, so neither its constructor nor its registration changes); a table
#: gone, its entry goes too.
_INDEXES: dict[int, DeadlineIndex] = {}


def attach(table: object, index: DeadlineIndex) -> DeadlineIndex:
    """Make `index` the one :func:`written` updates for writes to `table`."""
    _INDEXES[id(table)] = index
    weakref.finalize(table, _INDEXES.pop, id(table), None)
    return index


def written(table: object, escrow: Escrow) -> None:
    """Step 1: the processor has just written `escrow` to `table`."""
    index = _INDEXES.get(id(table))
    if index is not None:
        index.note(escrow)
