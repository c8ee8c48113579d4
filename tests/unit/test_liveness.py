"""The stall rule of ``escrow_stream.liveness.ProgressMonitor``, on an injected clock."""

from __future__ import annotations

from typing import Any

from escrow_stream.liveness import CONSUMER_LAG, ProgressMonitor

TIMEOUT_S = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def monitor() -> tuple[ProgressMonitor, FakeClock]:
    clock = FakeClock()
    return ProgressMonitor("unit.commands", TIMEOUT_S, monotonic=clock, wall=clock), clock


def test_lag_without_progress_for_the_timeout_is_a_stall_of_that_partition() -> None:
    m, clock = monitor()
    m.assigned([0, 1])
    assert m.observe({0: 5, 1: 0}) == frozenset()
    clock.now += TIMEOUT_S - 1
    assert m.observe({0: 5, 1: 0}) == frozenset()
    assert not m.stalled
    clock.now += 1
    assert m.observe({0: 5, 1: 0}) == {0}
    assert m.stalled and m.stalled_partitions == {0}
    clock.now += 5
    assert m.observe({0: 5, 1: 0}) == frozenset()  # reported once, still stalled
    assert m.stalled


def test_progress_between_checks_restarts_the_clock_and_clears_the_stall() -> None:
    m, clock = monitor()
    m.assigned([0])
    m.observe({0: 3})
    clock.now += TIMEOUT_S
    assert m.observe({0: 3}) == {0}
    m.processed(0, 41)
    assert m.observe({0: 2}) == frozenset()
    assert not m.stalled
    assert m.next_offset[0] == 42
    clock.now += TIMEOUT_S - 1
    assert m.observe({0: 2}) == frozenset()  # the clock restarted at the progress
    assert not m.stalled


def test_an_idle_partition_without_lag_never_stalls() -> None:
    m, clock = monitor()
    m.assigned([0])
    for _ in range(10):
        clock.now += TIMEOUT_S
        assert m.observe({0: 0}) == frozenset()
    assert not m.stalled


def test_rebalancing_or_recovery_stops_every_clock() -> None:
    m, clock = monitor()
    m.assigned([0])
    m.observe({0: 9})
    clock.now += TIMEOUT_S - 1
    m.pause()  # e.g. a long table recovery
    clock.now += 10 * TIMEOUT_S
    assert m.observe({0: 9}) == frozenset()
    assert not m.stalled


def test_a_new_assignment_forgets_revoked_partitions_and_their_lag_gauges() -> None:
    m, clock = monitor()
    m.assigned([0, 1])
    m.processed(1, 7)
    m.observe({0: 1, 1: 4})
    assert CONSUMER_LAG.labels("unit.commands", "1")._value.get() == 4
    m.assigned([0])
    assert 1 not in m.next_offset
    assert ("unit.commands", "1") not in CONSUMER_LAG._metrics
    clock.now += TIMEOUT_S
    assert m.observe({0: 1}) == frozenset()  # its clock started again at the assignment


def test_ready_only_after_joining_the_group_and_recovering_tables() -> None:
    from types import SimpleNamespace

    from escrow_stream.liveness import processing_ready

    def app(generation: int, rebalancing: bool, recovering: bool, completed: bool) -> Any:
        event = SimpleNamespace(is_set=lambda: completed)
        tables = SimpleNamespace(_recovery=SimpleNamespace(completed=event))
        return SimpleNamespace(
            consumer_generation_id=generation,
            rebalancing=rebalancing,
            in_recovery=recovering,
            tables=tables,
        )

    assert processing_ready(app(3, False, False, True))
    assert not processing_ready(app(0, False, False, True))  # not in the group yet
    assert not processing_ready(app(3, True, False, True))  # rebalancing
    assert not processing_ready(app(3, False, True, True))  # restoring tables
    assert not processing_ready(app(3, False, False, False))  # first recovery not done
