"""The facts the processor looks up before deciding: which ones, and retrying them."""

from __future__ import annotations

import asyncio

import pytest
from domain_support import BUYER_ID, SELLER_ID, command, create_payload, reach

from escrow_stream.agents.handling import facts_needed
from escrow_stream.agents.processor import LOOKUP_RETRY_CAP_S, LOOKUP_RETRY_FIRST_S
from escrow_stream.retry import until_answered

LIMITS = {"first_s": LOOKUP_RETRY_FIRST_S, "cap_s": LOOKUP_RETRY_CAP_S}

BOTH = frozenset({BUYER_ID, SELLER_ID})


def test_kyc_and_the_payout_account_are_looked_up_for_every_release_path() -> None:
    state = reach("DELIVERED").state
    create = command("CreateEscrow", "c1", "buyer", create_payload())
    assert facts_needed(create, None) == (BOTH, False)
    for releasing in (
        command("ReleaseFunds", "c2", "buyer", {}),
        command("ReleaseFunds", "c3", "system", {"reason": "TIMEOUT"}),
        command("ReleaseMilestone", "c4", "buyer", {"milestoneId": "m1"}),
        command("ResolveDispute", "c5", "admin", {"resolution": "RELEASE", "reason": "x"}),
    ):
        assert facts_needed(releasing, state) == (BOTH, True), releasing
    resume = command("ResumeSettlement", "c6", "system", {"settlementId": "x"})
    assert facts_needed(resume, state) == (frozenset(), True)
    for other in (
        command("ResolveDispute", "c7", "admin", {"resolution": "REFUND", "reason": "x"}),
        command("RefundEscrow", "c8", "admin", {"reason": "x"}),
        command("MarkDelivered", "c9", "seller", {}),
    ):
        assert facts_needed(other, state) == (frozenset(), False), other
    assert facts_needed(command("ReleaseFunds", "c10", "buyer", {}), None) == (frozenset(), False)


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
