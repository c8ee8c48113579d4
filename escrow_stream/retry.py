"""Waiting out a dependency every escrow shares (PostgreSQL, mostly) inside an agent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    delay_s = first_s
    while True:
        try:
            return await call()
        except Exception as exc:
            if stopping():
                raise
            log.warning("%s failed, retry in %.1f s: %r", what, delay_s, exc)
            await sleep(delay_s)
            delay_s = min(cap_s, delay_s * 2)
