"""The one capped exponential backoff (``backoff_s``, ``delays``) and ``until_answered``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import pytest

from escrow_stream.retry import (
    DOUBLINGS_MAX,
    SCHEDULED_FLOOR_S,
    backoff_s,
    delays,
    until_answered,
)


def first(n: int, waits: Iterator[float]) -> list[float]:
    return list(itertools.islice(waits, n))


def test_the_first_wait_is_first_s() -> None:
    assert backoff_s(0, 1.0, 300.0) == 1.0
    assert backoff_s(0, 0.25, 60.0) == 0.25


def test_each_attempt_doubles_the_wait() -> None:
    assert [backoff_s(a, 1.0, 300.0) for a in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert [backoff_s(a, 0.1, 100.0) for a in range(3)] == [0.1, 0.2, 0.4]


def test_the_wait_never_exceeds_the_cap() -> None:
    assert [backoff_s(a, 1.0, 300.0) for a in range(7, 11)] == [128.0, 256.0, 300.0, 300.0]
    assert backoff_s(0, 20.0, 5.0) == 5.0  # a first wait above the cap is capped too


def test_the_floor_raises_the_wait_doubling_starts_from() -> None:
    assert backoff_s(0, 0.0, 300.0, floor_s=SCHEDULED_FLOOR_S) == 0.05
    assert backoff_s(3, 0.01, 300.0, floor_s=SCHEDULED_FLOOR_S) == 0.4
    assert backoff_s(3, 1.0, 300.0, floor_s=SCHEDULED_FLOOR_S) == 8.0  # no effect above it
    assert backoff_s(5, 0.0, 300.0) == 0.0  # no floor: zero stays zero


@pytest.mark.parametrize("attempt", [DOUBLINGS_MAX, 1_100, 10**6, 10**100])
def test_a_huge_attempt_count_is_the_cap_not_an_overflow(attempt: int) -> None:
    assert backoff_s(attempt, 0.001, 300.0) == 300.0
    assert backoff_s(attempt, 1e300, 1e308) == 1e308


def test_delays_start_with_first_s_as_given_then_double_up_to_the_cap() -> None:
    assert first(8, delays(0.5, 30.0)) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert first(3, delays(20.0, 10.0)) == [20.0, 10.0, 10.0]  # only later waits are capped
    assert first(3, delays(0.0, 10.0)) == [0.0, 0.0, 0.0]


def test_delays_after_the_first_are_at_least_the_floor() -> None:
    assert first(5, delays(0.0, 10.0, floor_s=0.01)) == [0.0, 0.01, 0.02, 0.04, 0.08]
    assert first(4, delays(0.003, 10.0, floor_s=0.01)) == [0.003, 0.01, 0.02, 0.04]
    assert first(3, delays(0.05, 10.0, floor_s=0.01)) == [0.05, 0.1, 0.2]


def test_delays_is_each_wait_twice_the_one_before_floored_and_capped() -> None:
    for first_s, cap_s, floor_s in itertools.product(
        (0.0, 0.001, 0.004, 0.007, 0.05, 1.0, 7.5, 20.0), (5.0, 10.0, 300.0), (0.0, 0.01)
    ):
        expected = [first_s]
        while len(expected) < 80:
            expected.append(min(cap_s, max(expected[-1] * 2, floor_s)))
        assert first(80, delays(first_s, cap_s, floor_s=floor_s)) == expected


def test_until_answered_waits_the_delays_until_the_call_answers() -> None:
    calls: list[int] = []
    waits: list[float] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 8:
            raise ConnectionError("postgres is down")
        return "answer"

    async def sleep(delay_s: float) -> None:
        waits.append(delay_s)

    answer = asyncio.run(
        until_answered("test", flaky, lambda: False, first_s=0.5, cap_s=10.0, sleep=sleep)
    )
    assert answer == "answer"
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
