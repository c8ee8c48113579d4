"""The one capped exponential backoff; waiting out a shared dependency inside an agent."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Doublings past this many add nothing: 2**64 times any first wait is beyond every cap, and
#: a huge attempt count cannot overflow.
DOUBLINGS_MAX = 64
#: The least first wait of a retry scheduled in PostgreSQL from ``ESCROW_RETRY_DELAY_MS``
#: (a row's next attempt time): even at 0 ms a failing row is not due again at once, forever.
SCHEDULED_FLOOR_S = 0.05


def backoff_s(attempt: int, first_s: float, cap_s: float, *, floor_s: float = 0.0) -> float:
    """Seconds to wait after failed try ``attempt`` (0 for the first failure):
    ``max(first_s, floor_s)``, doubled ``attempt`` times, never more than ``cap_s``.

    The only exponential backoff in the package: code that counts its attempts (a row
    rescheduled in PostgreSQL, a client honouring ``Retry-After``) calls it directly; a loop
    that only waits again iterates :func:`delays`."""
    return min(cap_s, max(first_s, floor_s) * 2.0 ** min(attempt, DOUBLINGS_MAX))


def delays(first_s: float, cap_s: float, *, floor_s: float = 0.0) -> Iterator[float]:
    """The waits of an in-process retry loop, endless: ``first_s`` as given, then each wait
    twice the one before, at least ``floor_s`` (so a zero ``first_s`` still backs off) and
    at most ``cap_s``."""
    yield first_s
    for attempt in itertools.count():
        yield backoff_s(attempt, 2 * first_s, cap_s, floor_s=floor_s)


async def until_answered(
    what: str,
    call: Callable[[], Awaitable[T]],
    stopping: Callable[[], bool],
    *,
    first_s: float,
    cap_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``call()``, retried after ``first_s`` doubling up to ``cap_s`` until it answers: the
    partition waits, the agent neither crashes nor goes on without the answer.  Gives up
    (raises the last error) only when ``stopping()``."""
    waits = delays(first_s, cap_s)
    while True:
        try:
            return await call()
        except Exception as exc:
            if stopping():
                raise
            delay_s = next(waits)
            log.warning("%s failed, retry in %.1f s: %r", what, delay_s, exc)
            await sleep(delay_s)
