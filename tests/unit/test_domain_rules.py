"""Named business rules: funds, deadlines, timeouts, settlement, duplicates, KYC, milestones."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from domain_support import (
    AMOUNT,
    ESCROW_ID,
    T0,
    Run,
    command,
    create_payload,
    days,
    fold,
    payload_for,
    reach,
)

from escrow_stream.domain import (
    CancelEscrow,
    DecisionContext,
    DomainSettings,
    EvolveError,
    RefundEscrow,
    ReleaseFunds,
    check_invariants,
    decide,
    evolve,
    ledger_balances,
    timeout_command_for,
)

FUNDS = {
    "provider": "stripe",
    "providerPaymentId": "pi_1",
    "amount": str(AMOUNT),
    "currency": "USD",
}


def _code(run: Run, command_type: str, role: str, payload: dict[str, Any] | None = None) -> str:
    decision = run.send(command_type, role, payload)
    assert decision.rejection is not None, decision.events
    return str(decision.rejection.code)


# --- funds ------------------------------------------------------------------------------


def test_confirm_funds_twice_with_the_same_payment_is_a_no_op() -> None:
    run = reach("FUNDS_HELD")
    before = run.state
    decision = run.send("ConfirmFunds", "system", FUNDS)
    assert decision.rejection is None and decision.events == [] and not decision.duplicate
    assert run.state == before


def test_confirm_funds_with_another_payment_after_funding_is_an_invalid_transition() -> None:
    run = reach("FUNDS_HELD")
    assert _code(run, "ConfirmFunds", "system", {**FUNDS, "providerPaymentId": "pi_9"}) == (
        "INVALID_TRANSITION"
    )


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"amount": str(AMOUNT - 1)}, "AMOUNT_MISMATCH"),
        ({"currency": "USDC"}, "AMOUNT_MISMATCH"),
        ({"provider": "custodian"}, "VALIDATION_FAILED"),
    ],
)
def test_confirm_funds_must_match_the_escrow(change: dict[str, str], code: str) -> None:
    run = reach("AWAIT_FUNDS")
    assert _code(run, "ConfirmFunds", "system", {**FUNDS, **change}) == code


def test_funding_posts_external_to_holding() -> None:
    run = reach("FUNDS_HELD")
    assert run.state is not None
    assert ledger_balances(run.state) == {
        "external:stripe": -AMOUNT,
        f"escrow:{ESCROW_ID}:holding": AMOUNT,
    }


# --- deadlines and timeouts -------------------------------------------------------------


def test_expires_at_and_payment_timeout() -> None:
    run = Run(DomainSettings(payment_deadline_days=3))
    run.ok("CreateEscrow", "buyer", create_payload())
    assert run.state is not None and run.state.expires_at == T0 + days(3)
    assert timeout_command_for(run.state, run.now + days(2.9), run.settings) is None
    run.advance(days(2.9))
    assert _code(run, "CancelEscrow", "system", {"reason": "TIMEOUT"}) == "DEADLINE_NOT_REACHED"
    run.advance(days(0.1))
    due = timeout_command_for(run.state, run.now, run.settings)
    assert isinstance(due, CancelEscrow)
    assert due.command_id == f"timeout:{ESCROW_ID}:AWAIT_FUNDS:1"
    assert (due.actor.id, due.actor.role) == ("timeout-processor", "system")
    decision = decide(run.state, due, run.now, run.settings)
    assert decision.events[0].escrow.status == "CANCELLED"
    again = decide(decision.events[0].escrow, due, run.now, run.settings)
    assert again.duplicate and again.events[0].event_id == decision.events[0].event_id


def test_delivered_timeout_refunds_by_default() -> None:
    run = reach("DELIVERED")
    assert run.state is not None and run.state.auto_refund_at == T0 + days(7)
    assert _code(run, "RefundEscrow", "system", {"reason": "TIMEOUT"}) == "DEADLINE_NOT_REACHED"
    run.advance(days(7))
    due = timeout_command_for(run.state, run.now, run.settings)
    assert isinstance(due, RefundEscrow)
    decision = decide(run.state, due, run.now, run.settings)
    settlement = decision.events[0].escrow.settlement
    assert settlement is not None
    assert (settlement.kind, settlement.reason, settlement.amount) == ("REFUND", "TIMEOUT", AMOUNT)
    assert timeout_command_for(decision.events[0].escrow, run.now, run.settings) is None


def test_delivered_timeout_is_disabled_without_auto_refund() -> None:
    run = reach("DELIVERED")
    run.settings = DomainSettings(feature_auto_refund=False)
    run.advance(days(30))
    assert run.state is not None
    assert timeout_command_for(run.state, run.now, run.settings) is None
    assert _code(run, "RefundEscrow", "system", {"reason": "TIMEOUT"}) == "FEATURE_DISABLED"


def test_delivered_timeout_can_release_instead() -> None:
    run = reach("DELIVERED")
    run.settings = DomainSettings(delivered_timeout_action="release")
    run.advance(days(7))
    assert run.state is not None
    due = timeout_command_for(run.state, run.now, run.settings)
    assert isinstance(due, ReleaseFunds)
    assert _code(run, "RefundEscrow", "system", {"reason": "TIMEOUT"}) == "FEATURE_DISABLED"
    decision = decide(run.state, due, run.now, run.settings)
    settlement = decision.events[0].escrow.settlement
    assert settlement is not None and settlement.kind == "RELEASE"


def test_timeout_reasons_are_reserved_for_the_system() -> None:
    assert _code(reach("AWAIT_FUNDS"), "CancelEscrow", "buyer", {"reason": "TIMEOUT"}) == (
        "NOT_AUTHORIZED"
    )
    assert _code(
        reach("AWAIT_FUNDS"), "CancelEscrow", "admin", {"reason": "COMPLIANCE_REJECTED"}
    ) == ("NOT_AUTHORIZED")
    assert _code(reach("DELIVERED"), "RefundEscrow", "seller", {"reason": "TIMEOUT"}) == (
        "NOT_AUTHORIZED"
    )
    assert _code(reach("DELIVERED"), "RefundEscrow", "system", {"reason": "asked"}) == (
        "NOT_AUTHORIZED"
    )
    run = reach("AWAIT_FUNDS")
    run.ok("CancelEscrow", "system", {"reason": "COMPLIANCE_REJECTED"})


# --- settlement -------------------------------------------------------------------------


def test_settlement_is_two_phase_and_blocks_other_commands() -> None:
    run = reach("DELIVERED", pending=True)
    assert run.state is not None and run.state.status == "DELIVERED"
    settlement = run.state.settlement
    assert settlement is not None
    assert (settlement.amount, settlement.fee_amount, settlement.payout_amount) == (
        10_000,
        500,
        9_500,
    )
    assert _code(run, "RaiseDispute", "buyer", {"reason": "x"}) == "SETTLEMENT_PENDING"
    assert _code(run, "RefundEscrow", "admin", {"reason": "x"}) == "SETTLEMENT_PENDING"
    first = settlement.settlement_id
    assert first == f"escrow-release:{ESCROW_ID}:all:1"
    wrong = {
        "settlementId": first,
        "provider": "stripe",
        "providerReference": "tr_1",
        "amount": "10000",
    }
    assert _code(run, "ConfirmSettlement", "system", wrong) == "AMOUNT_MISMATCH"
    failure = payload_for("RecordSettlementFailure", "system", run.state)
    decision = run.ok("RecordSettlementFailure", "system", failure)
    assert decision.events[0].type == "SettlementFailed"
    assert run.state.settlement is None and run.state.status == "DELIVERED"
    run.ok("ReleaseFunds", "buyer")
    assert run.state.settlement is not None and run.state.settlement.attempt == 2
    assert run.state.settlement.settlement_id == f"escrow-release:{ESCROW_ID}:all:2"
    stale = {**wrong, "amount": "9500"}  # attempt 1's transfer, reported late
    assert _code(run, "ConfirmSettlement", "system", stale) == "SETTLEMENT_MISMATCH"
    current = run.state.settlement.settlement_id
    run.ok("ConfirmSettlement", "system", {**stale, "settlementId": current})
    assert run.state.status == "RELEASED"
    assert ledger_balances(run.state) == {
        "external:stripe": -10_000,
        f"escrow:{ESCROW_ID}:holding": 0,
        "seller:seller-1": 9_500,
        "platform:fees": 500,
    }


def test_refund_posts_holding_to_buyer() -> None:
    run = reach("REFUNDED")
    assert run.state is not None
    balances = ledger_balances(run.state)
    assert balances["buyer:buyer-1"] == AMOUNT and balances[f"escrow:{ESCROW_ID}:holding"] == 0
    assert [m.status for m in run.state.milestones] == ["REFUNDED", "REFUNDED"]


# --- duplicates -------------------------------------------------------------------------


def test_a_duplicate_command_replays_the_recorded_event() -> None:
    run = reach("FUNDS_HELD")
    first = run.send("MarkDelivered", "seller", {}, command_id="deliver-1")
    state = run.state
    again = run.send("MarkDelivered", "seller", {}, command_id="deliver-1")
    assert again.duplicate and again.rejection is None
    assert again.events == first.events  # newest command: byte-for-byte the same event
    assert run.state == state


def test_create_twice_same_id_is_a_duplicate_other_id_already_exists() -> None:
    run = Run()
    first = run.send("CreateEscrow", "buyer", create_payload(), command_id="create-1")
    again = run.send("CreateEscrow", "buyer", create_payload(), command_id="create-1")
    assert again.duplicate and again.events[0].event_id == first.events[0].event_id
    assert _code(run, "CreateEscrow", "buyer", create_payload()) == "ALREADY_EXISTS"


def test_a_rejected_command_is_decided_again() -> None:
    run = reach("AWAIT_FUNDS")
    assert run.send("MarkDelivered", "seller", {}, command_id="early").rejection is not None
    run.ok("ConfirmFunds", "system", FUNDS)
    decision = run.send("MarkDelivered", "seller", {}, command_id="early")
    assert decision.rejection is None and not decision.duplicate


def test_the_duplicate_record_is_bounded_fifo_and_rebuilt_by_folding() -> None:
    run = Run(DomainSettings(recent_commands_max=2))
    run.send("CreateEscrow", "buyer", create_payload(milestones=False), command_id="a")
    run.send(
        "RecordPaymentInstructions",
        "system",
        payload_for("RecordPaymentInstructions", "", None),
        command_id="b",
    )
    run.send("ConfirmFunds", "system", FUNDS, command_id="c")
    assert run.state is not None
    assert [r.command_id for r in run.state.recent_commands] == ["b", "c"]
    assert fold(run.events) == run.state
    assert run.send("ConfirmFunds", "system", FUNDS, command_id="c").duplicate
    assert _code(run, "CreateEscrow", "buyer", create_payload()) == "ALREADY_EXISTS"


# --- KYC, features, limits ----------------------------------------------------------------


def test_kyc_gating_on_create_and_release() -> None:
    settings = DomainSettings(feature_kyc_gating=True)
    cmd = command("CreateEscrow", "c1", "buyer", create_payload())
    only_buyer = DecisionContext(kyc_verified_user_ids=frozenset({"buyer-1"}))
    both = DecisionContext(kyc_verified_user_ids=frozenset({"buyer-1", "seller-1"}))
    for context in (None, only_buyer):
        rejection = decide(None, cmd, T0, settings, context).rejection
        assert rejection is not None and rejection.code == "KYC_REQUIRED"
    assert decide(None, cmd, T0, settings, both).rejection is None
    run = reach("DELIVERED")
    release = command("ReleaseFunds", "r1", "buyer", None)
    rejection = decide(run.state, release, T0, settings, only_buyer).rejection
    assert rejection is not None and rejection.code == "KYC_REQUIRED"
    assert decide(run.state, release, T0, settings, both).rejection is None


def test_milestones_need_their_feature_flag() -> None:
    settings = DomainSettings(feature_milestone_escrows=False)
    with_milestones = command("CreateEscrow", "c1", "buyer", create_payload())
    rejection = decide(None, with_milestones, T0, settings).rejection
    assert rejection is not None and rejection.code == "FEATURE_DISABLED"
    plain = command("CreateEscrow", "c1", "buyer", create_payload(milestones=False))
    assert decide(None, plain, T0, settings).rejection is None


@pytest.mark.parametrize("limit", [9_999, {"USD": 9_999}])
def test_amount_above_the_maximum_fails_validation(limit: object) -> None:
    settings = DomainSettings.model_validate({"max_amount_minor": limit})
    rejection = decide(
        None, command("CreateEscrow", "c1", "buyer", create_payload()), T0, settings
    ).rejection
    assert rejection is not None and rejection.code == "VALIDATION_FAILED"


# --- milestones -------------------------------------------------------------------------


def test_milestones_release_one_by_one_and_the_last_releases_the_escrow() -> None:
    run = reach("FUNDS_HELD")  # m1 delivered, m2 pending
    assert _code(run, "ReleaseMilestone", "buyer", {"milestoneId": "m2"}) == "INVALID_TRANSITION"
    assert _code(run, "ReleaseMilestone", "buyer", {"milestoneId": "m9"}) == "VALIDATION_FAILED"
    run.ok("ReleaseMilestone", "buyer", {"milestoneId": "m1"})
    assert run.state is not None and run.state.settlement is not None
    assert (run.state.settlement.amount, run.state.settlement.fee_amount) == (6_000, 300)
    run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "", run.state))
    assert run.state.status == "FUNDS_HELD" and run.state.released_amount == 6_000
    decision = run.ok("DeliverMilestone", "seller", {"milestoneId": "m2"})
    assert run.state.status == "DELIVERED" and run.state.auto_refund_at == run.now + days(7)
    assert decision.events[0].type == "MilestoneDelivered"
    run.ok("ReleaseMilestone", "admin", {"milestoneId": "m2"})
    decision = run.ok(
        "ConfirmSettlement", "system", payload_for("ConfirmSettlement", "", run.state)
    )
    assert decision.events[0].type == "MilestoneReleased"
    assert run.state.status == "RELEASED"
    assert ledger_balances(run.state)["platform:fees"] == 500
    assert ledger_balances(run.state)["seller:seller-1"] == 9_500
    assert check_invariants(run.state) == []


def test_refunding_a_milestone_escrow_refunds_the_remainder() -> None:
    run = reach("FUNDS_HELD")
    run.ok("ReleaseMilestone", "buyer", {"milestoneId": "m1"})
    run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "", run.state))
    run.ok("RefundEscrow", "seller", {"reason": "cannot finish"})
    run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "", run.state))
    assert run.state is not None and run.state.status == "REFUNDED"
    assert (run.state.released_amount, run.state.refunded_amount) == (6_000, 4_000)
    assert [m.status for m in run.state.milestones] == ["RELEASED", "REFUNDED"]
    assert check_invariants(run.state) == []


# --- invariants and misuse ------------------------------------------------------------------


def test_check_invariants_reports_tampering() -> None:
    run = reach("RELEASED")
    assert run.state is not None and check_invariants(run.state) == []
    tampered = run.state.model_copy(update={"released_amount": 20_000})
    assert check_invariants(tampered)


def test_decide_requires_an_aware_clock() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(None, command("CreateEscrow", "c1", "buyer", create_payload()), datetime(2025, 1, 1))


def test_evolve_refuses_a_version_gap() -> None:
    run = reach("DELIVERED")
    with pytest.raises(EvolveError):
        evolve(run.events[0].escrow, run.events[-1])
    with pytest.raises(EvolveError):
        evolve(None, run.events[1])
