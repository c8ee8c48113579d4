"""The deadline index and the timeout tick built on it (pure, with a dict for the table and
a fake owner): the tick finds exactly what a scan of the whole table finds, and reads only
the escrows that are due."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from datetime import datetime, timedelta
from typing import Any

from domain_support import T0, days
from hypothesis import given, settings
from hypothesis import strategies as st
from test_deadlines import TEMPLATES, escrows

from escrow_stream.agents.timeouts import REBUILD_CHUNK, Tick, TimeoutScanner, due_timeouts
from escrow_stream.domain import DomainSettings, Escrow
from escrow_stream.domain.timeouts import Deadlines, holds_card_funds_past
from escrow_stream.tables import deadlines
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables.deadlines import HEAP_COMPACT_MIN, DeadlineIndex

RULES = DomainSettings()
WARN_DAYS = 80


def at(hours: int) -> datetime:
    return T0 + timedelta(hours=hours)


class Table(dict[str, bytes]):
    """The ``escrows`` table as a dict, counting the escrows the timeout processor reads
    and its scans of the keys."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.scans = 0

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.reads += 1
        return super().get(key, default)

    def keys(self) -> Any:
        self.scans += 1
        return super().keys()

    def write(self, escrow: Escrow, hooked: bool = True) -> None:
        """The processor's write (with its hook), or a changelog restore's (without)."""
        self[escrow.escrow_id] = escrow_table.dump(escrow)
        if hooked:
            deadlines.written(self, escrow)


class Owner:
    """A worker's ownership as the scanner sees it: a key and whether it is ready;
    `meanwhile` runs at each readiness check (what happens while the scanner yields)."""

    def __init__(self) -> None:
        self.generation = 1
        self.is_ready = True
        self.checks = 0
        self.meanwhile: Callable[[int], None] = lambda check: None

    def key(self) -> Hashable:
        return (self.generation, frozenset({0, 1, 2}))

    def ready(self) -> bool:
        self.checks += 1
        self.meanwhile(self.checks)
        return self.is_ready


def worker(table: Table) -> tuple[TimeoutScanner, DeadlineIndex, Owner]:
    index = deadlines.attach(table, DeadlineIndex(RULES, WARN_DAYS))
    owner = Owner()
    return TimeoutScanner(table, index, RULES, owner), index, owner


def renamed(escrow: Escrow, n: int | str) -> Escrow:
    return escrow.model_copy(update={"escrow_id": f"esc-{n}"})


def tick(scanner: TimeoutScanner, now: datetime) -> Tick | None:
    return asyncio.run(scanner.tick(now))


# --- the index -------------------------------------------------------------------------


def test_a_timeout_is_due_from_its_deadline_until_it_changes() -> None:
    index = DeadlineIndex(RULES)
    index.put("a", Deadlines(at(10), None))
    index.put("b", Deadlines(at(20), None))
    assert index.advance(at(9)) == []
    assert index.advance(at(10)) == ["a"]  # at the deadline, as timeout_command_for
    assert index.advance(at(11)) == ["a"]  # until the escrow changes (sent again, as before)
    index.put("a", Deadlines(at(10), None))  # rewritten unchanged (e.g. a duplicate)
    assert index.due == ["a"]
    index.put("a", Deadlines(None, None))  # cancelled: nothing more to time out
    assert index.advance(at(30)) == ["b"]
    assert len(index) == 1


def test_a_moved_deadline_leaves_its_old_entry_behind_harmlessly() -> None:
    index = DeadlineIndex(RULES)
    index.put("a", Deadlines(at(10), None))
    index.put("a", Deadlines(at(40), None))  # lazy deletion: (10, a) stays in the heap
    index.put("b", Deadlines(at(5), None))
    index.discard("b")
    assert index.advance(at(20)) == []
    assert index.advance(at(40)) == ["a"]
    index.put("a", Deadlines(at(50), None))
    assert index.due == []  # a new deadline: not due before it
    assert index.advance(at(45)) == []


def test_a_hold_counts_strictly_after_the_warning_and_is_looked_at_once() -> None:
    index = DeadlineIndex(RULES)
    index.put("a", Deadlines(None, at(10)))
    index.put("b", Deadlines(at(15), at(12)))
    assert index.advance(at(10)) == [] and index.past_warning == 0
    assert index.advance(at(11)) == ["a"] and index.past_warning == 1
    assert index.advance(at(12)) == [] and index.past_warning == 1  # a: already counted
    assert index.advance(at(16)) == ["b"] and index.past_warning == 2
    index.put("a", Deadlines(None, None))  # released: holds nothing now
    assert index.advance(at(17)) == ["b"] and index.past_warning == 1


def test_rebuild_replaces_everything() -> None:
    index = DeadlineIndex(RULES, WARN_DAYS)
    index.put("gone", Deadlines(at(1), None))
    assert index.advance(at(2)) == ["gone"]
    awaiting, held = renamed(TEMPLATES[0], 1), renamed(TEMPLATES[2], 2)
    released = renamed(TEMPLATES[7], 3)
    index.begin_rebuild()
    read = {e.escrow_id: index.deadlines_of(e) for e in (awaiting, held, released)}
    index.finish_rebuild(read, built_for="key")
    assert index.built_for == "key"
    assert len(index) == 2  # the released one has no deadline: not kept
    assert index.advance(at(2)) == []
    assert index.advance(awaiting.expires_at) == ["esc-1"]
    funded_at = held.payment.funded_at  # type: ignore[union-attr]
    assert funded_at is not None
    assert index.advance(funded_at + days(WARN_DAYS + 1)) == ["esc-1", "esc-2"]
    assert index.past_warning == 1


times = st.integers(min_value=0, max_value=60).map(at)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.integers(0, 7),
            st.builds(Deadlines, st.none() | times, st.none() | times),
        ),
        st.tuples(st.just("discard"), st.integers(0, 7), st.none()),
        st.tuples(st.just("advance"), st.integers(0, 12), st.none()),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_the_index_agrees_with_a_scan_of_every_deadline(ops: list[tuple[str, int, Any]]) -> None:
    index = DeadlineIndex(RULES)
    model: dict[str, Deadlines] = {}
    now = at(0)
    for op, n, value in ops:
        escrow_id = f"e{n}"
        if op == "put":
            index.put(escrow_id, value)
            model[escrow_id] = value
        elif op == "discard":
            index.discard(escrow_id)
            model.pop(escrow_id, None)
        else:
            now += timedelta(hours=n)
            looked_at = index.advance(now)
            due = {e for e, d in model.items() if d.timeout_at is not None and d.timeout_at <= now}
            past = {
                e
                for e, d in model.items()
                if d.hold_warning_after is not None and d.hold_warning_after < now
            }
            assert set(index.due) == due
            assert due <= set(looked_at) <= due | past
            assert len(looked_at) == len(set(looked_at))
            assert index.past_warning == len(past)
    assert len(index) == sum(d != Deadlines() for d in model.values())


def test_the_heaps_stay_bounded_however_often_deadlines_move() -> None:
    index = DeadlineIndex(RULES)
    for n in range(10):
        index.put(f"e{n}", Deadlines(at(1000), at(1000)))
    for step in range(20_000):
        n = step % 10
        index.put(f"e{n}", Deadlines(at(step), at(step + 1)))
    assert index.heap_entries <= max(HEAP_COMPACT_MIN, 4 * len(index)) + 2
    assert set(index.advance(at(30_000))) == {f"e{n}" for n in range(10)}


def test_the_processor_hook_updates_the_index_of_its_table_only() -> None:
    table, other = Table(), Table()
    index = deadlines.attach(table, DeadlineIndex(RULES))
    awaiting = renamed(TEMPLATES[0], 1)
    deadlines.written(table, awaiting)
    deadlines.written(other, renamed(TEMPLATES[0], 2))  # no index attached: nothing
    assert index.deadlines("esc-1") == Deadlines(awaiting.expires_at, None)
    assert len(index) == 1


# --- the tick --------------------------------------------------------------------------


def test_a_tick_with_nothing_due_reads_no_escrow() -> None:
    table = Table()
    scanner, index, _ = worker(table)
    for n in range(3000):
        table.write(renamed(TEMPLATES[n % len(TEMPLATES)], n), hooked=False)  # restored
    first = tick(scanner, T0)
    assert first is not None and first.rebuilt_from == 3000 and first.commands == []
    assert (table.scans, table.reads) == (1, 3000)
    for hour in range(1, 100):
        later = tick(scanner, at(hour))
        assert later is not None and later.commands == [] and later.rebuilt_from is None
    assert (table.scans, table.reads) == (1, 3000)  # not one more
    assert index.built_for is not None


def test_a_tick_reads_only_what_came_due_and_sends_what_a_full_scan_would() -> None:
    table = Table()
    scanner, _, _ = worker(table)
    assert tick(scanner, T0) is not None  # built (empty) before the writes: the hook feeds it
    for n in range(900):
        table.write(renamed(TEMPLATES[n % len(TEMPLATES)], n))
    later = T0 + days(RULES.payment_deadline_days) + timedelta(seconds=1)
    table.reads = 0
    found = tick(scanner, later)
    full = due_timeouts(list(dict.values(table)), later, RULES)
    assert found is not None and found.rebuilt_from is None
    assert sorted(c.command_id for c in found.commands) == sorted(c.command_id for c in full)
    types = [c.type for c in found.commands]
    assert (types.count("CancelEscrow"), types.count("RefundEscrow")) == (100, 100)
    assert table.reads == 200  # the due ones, nothing else of the 900


def test_no_tick_while_rebalancing_and_a_rebuild_for_each_new_ownership() -> None:
    table = Table()
    scanner, index, owner = worker(table)
    table.write(renamed(TEMPLATES[0], 1), hooked=False)
    owner.is_ready = False
    assert tick(scanner, T0) is None and table.reads == 0
    owner.is_ready = True
    found = tick(scanner, T0)
    assert found is not None and found.rebuilt_from == 1
    # a partition lost and regained between two ticks: same partitions, new generation
    table.write(renamed(TEMPLATES[0], 2), hooked=False)
    owner.generation += 1
    found = tick(scanner, T0)
    assert found is not None and found.rebuilt_from == 2 and found.indexed == 2
    assert tick(scanner, T0).rebuilt_from is None  # type: ignore[union-attr]
    assert index.built_for == owner.key()


def test_a_rebalance_during_the_rebuild_stops_it_and_the_next_tick_starts_again() -> None:
    table = Table()
    scanner, index, owner = worker(table)
    for n in range(3 * REBUILD_CHUNK):
        table.write(renamed(TEMPLATES[0], n), hooked=False)

    def consumer_thread(check: int) -> None:
        if check == 3:  # after the first chunk was read: a rebalance begins
            owner.generation += 1

    owner.meanwhile = consumer_thread
    assert tick(scanner, T0) is None
    assert table.reads == REBUILD_CHUNK and index.built_for is None
    owner.meanwhile = lambda check: None
    assert tick(scanner, T0).rebuilt_from == 3 * REBUILD_CHUNK  # type: ignore[union-attr]
    assert index.built_for == owner.key() and len(index) == 3 * REBUILD_CHUNK


def test_what_the_processor_writes_during_a_rebuild_wins_over_what_it_read() -> None:
    table = Table()
    scanner, index, owner = worker(table)
    for n in range(2 * REBUILD_CHUNK):
        table.write(renamed(TEMPLATES[0], n), hooked=False)  # restored: AWAIT_FUNDS
    cancelled, fresh = renamed(TEMPLATES[1], 0), renamed(TEMPLATES[0], "new")

    def processor(check: int) -> None:
        if check == 3:  # esc-0 was read (first chunk); the processor runs meanwhile
            table.write(cancelled)  # esc-0 cancelled: no deadline any more
            table.write(fresh)  # an escrow created during the rebuild

    owner.meanwhile = processor
    found = tick(scanner, cancelled.expires_at + days(1))
    assert found is not None and found.rebuilt_from == 2 * REBUILD_CHUNK
    assert index.deadlines("esc-0") == Deadlines()
    assert index.deadlines("esc-new") == Deadlines(fresh.expires_at, None)
    assert len(index) == 2 * REBUILD_CHUNK
    assert "esc-0" not in {c.escrow_id for c in found.commands}


def test_a_stale_entry_is_checked_against_the_table_before_anything_is_sent() -> None:
    table = Table()
    scanner, index, _ = worker(table)
    awaiting = renamed(TEMPLATES[0], 1)
    table.write(awaiting)
    assert tick(scanner, T0) is not None
    cancelled = renamed(TEMPLATES[1], 1)  # written behind the index's back
    table.write(cancelled, hooked=False)
    found = tick(scanner, awaiting.expires_at)
    assert found is not None and found.commands == [] and found.read == 1
    assert len(index) == 0  # repaired from the table
    del table["esc-1"]
    index.put("esc-1", Deadlines(at(0), None))  # an escrow no longer in the table
    found = tick(scanner, awaiting.expires_at)
    assert found is not None and found.commands == [] and len(index) == 0


def rescan(table: Table, now: datetime) -> tuple[list[str], int]:
    """What the timer found before the index: a scan of every escrow."""
    values = list(dict.values(table))
    commands = sorted(c.command_id for c in due_timeouts(values, now, RULES))
    held = sum(
        holds_card_funds_past(e, now, WARN_DAYS)
        for e in (escrow_table.load(v) for v in values)
        if e is not None
    )
    return commands, held


steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 11), escrows(timeable=True)),
        st.tuples(st.just("restore"), st.integers(0, 11), escrows(timeable=True)),
        st.tuples(st.just("tick"), st.integers(0, 24 * 30), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_every_tick_finds_what_a_scan_of_the_whole_table_finds(
    script: list[tuple[str, int, Any]],
) -> None:
    """Writes through the processor's hook, restores behind it (each followed, as in Faust,
    by a new ownership key), and ticks at increasing times: each tick sends the very
    commands and counts the very holds that the full scan does."""
    table = Table()
    scanner, _, owner = worker(table)
    now = T0 - days(40)
    for op, n, escrow in script:
        if op == "write":
            table.write(renamed(escrow, n))
        elif op == "restore":
            table.write(renamed(escrow, n), hooked=False)
            owner.generation += 1
        else:
            now += timedelta(hours=n)
            found = tick(scanner, now)
            assert found is not None
            commands, held = rescan(table, now)
            assert sorted(c.command_id for c in found.commands) == commands
            assert found.holds_past_warning == held
