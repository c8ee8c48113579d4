"""The facts the processor looks up before deciding: which ones, and retrying them."""

from __future__ import annotations

import asyncio
import json

import pytest
from domain_support import BUYER_ID, SELLER_ID, reach

from escrow_stream.agents.processor import (
    LOOKUP_RETRY_CAP_S,
    LOOKUP_RETRY_FIRST_S,
    _facts_needed,
)
from escrow_stream.retry import until_answered

LIMITS = {"first_s": LOOKUP_RETRY_FIRST_S, "cap_s": LOOKUP_RETRY_CAP_S}

BOTH = frozenset({BUYER_ID, SELLER_ID})


def raw(type_: str, payload: dict[str, object] | None = None) -> bytes:
    return json.dumps({"type": type_, "payload": payload or {}}).encode()


def test_kyc_and_the_payout_account_are_looked_up_for_every_release_path() -> None:
    state = reach("DELIVERED").state
    create = raw("CreateEscrow", {"buyerId": "b", "sellerId": "s"})
    assert _facts_needed(create, None) == (frozenset({"b", "s"}), False)
    for command in (
        raw("ReleaseFunds"),
        raw("ReleaseFunds", {"reason": "TIMEOUT"}),
        raw("ReleaseMilestone", {"milestoneId": "m1"}),
        raw("ResolveDispute", {"resolution": "RELEASE", "reason": "x"}),
    ):
        assert _facts_needed(command, state) == (BOTH, True), command
    assert _facts_needed(raw("ResumeSettlement", {"settlementId": "x"}), state) == (
        frozenset(),
        True,
    )
    for command in (
        raw("ResolveDispute", {"resolution": "REFUND", "reason": "x"}),
        raw("RefundEscrow", {"reason": "x"}),
        raw("MarkDelivered"),
        b"not json",
        b"[1]",
    ):
        assert _facts_needed(command, state) == (frozenset(), False), command
    assert _facts_needed(raw("ReleaseFunds"), None) == (frozenset(), False)


def test_a_failing_lookup_is_retried_with_capped_backoff_until_it_answers() -> None:
    calls: list[int] = []
    waits: list[float] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 10:
            raise ConnectionError("postgres is down")
        return "answer"

    async def sleep(delay_s: float) -> None:
        waits.append(delay_s)

    assert asyncio.run(until_answered("test", flaky, lambda: False, sleep=sleep, **LIMITS)) == (
        "answer"
    )
    assert len(calls) == 10
    assert waits == sorted(waits) and max(waits) == LOOKUP_RETRY_CAP_S


def test_a_stopping_worker_gives_up_the_lookup() -> None:
    async def down() -> str:
        raise ConnectionError("postgres is down")

    async def sleep(delay_s: float) -> None:
        return None

    with pytest.raises(ConnectionError):
        asyncio.run(until_answered("test", down, lambda: True, sleep=sleep, **LIMITS))
