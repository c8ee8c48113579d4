"""SPEC §10 chargebacks in the pure domain: who may open and close them, what an open one
refuses, what won and lost do to the status and the ledger, and the invariants on every path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from escrow_stream.domain import (
    DomainSettings,
    EscrowStatus,
    check_invariants,
    is_allowed_transition,
    ledger_balances,
    parse_command,
    parse_event,
)
from escrow_stream.domain.escrow import ChargebackStatus, PostingKind
from escrow_stream.domain.ledger import PLATFORM_CHARGEBACKS_ACCOUNT
from escrow_stream.domain.timeouts import timeout_command_for
from tests.unit.domain_support import (
    AMOUNT,
    BUYER_ID,
    ESCROW_ID,
    SELLER_ID,
    Run,
    command,
    create_payload,
    days,
    fold,
    payload_for,
    reach,
)

DISPUTE = "dp_1"
SELLER_RECEIVABLE = f"seller:{SELLER_ID}:receivable"
BUYER_RECEIVABLE = f"buyer:{BUYER_ID}:receivable"
HOLDING = f"escrow:{ESCROW_ID}:holding"


def opened(dispute_id: str = DISPUTE, amount: int = AMOUNT, **changes: Any) -> dict[str, Any]:
    payload = {
        "provider": "stripe",
        "disputeId": dispute_id,
        "chargeId": "ch_1",
        "paymentIntentId": "pi_1",
        "amount": str(amount),
        "currency": "USD",
        "reason": "fraudulent",
    }
    return {**payload, **changes}


def closed(outcome: str, dispute_id: str = DISPUTE) -> dict[str, Any]:
    return {"disputeId": dispute_id, "outcome": outcome}


def code(run: Run, command_type: str, role: str, payload: dict[str, Any] | None = None) -> str:
    decision = run.send(command_type, role, payload)
    assert decision.rejection is not None, decision.events
    return decision.rejection.code.value


def assert_consistent(run: Run) -> None:
    """Invariants hold, every transition is in the seed table, folding rebuilds the state."""
    assert run.state is not None
    assert check_invariants(run.state) == []
    before = None
    for event in run.events:
        if before is not None:
            assert is_allowed_transition(before, event.escrow.status)
        before = event.escrow.status
    assert fold(run.events) == run.state


def test_open_on_held_funds_records_it_and_books_nothing() -> None:
    run = reach("FUNDS_HELD", milestones=False)
    decision = run.ok("OpenChargeback", "system", opened())
    (event,) = decision.events
    assert event.type == "ChargebackOpened"
    assert run.state is not None and run.state.status is EscrowStatus.FUNDS_HELD
    chargeback = run.state.chargeback
    assert chargeback is not None
    assert (chargeback.dispute_id, chargeback.status, chargeback.amount) == (
        DISPUTE,
        ChargebackStatus.OPEN,
        AMOUNT,
    )
    assert (chargeback.reason, chargeback.opened_at, chargeback.closed_at) == (
        "fraudulent",
        run.now,
        None,
    )
    assert chargeback.receivable_amount == 0
    assert [p.kind for p in run.state.ledger] == [PostingKind.FUNDS_HELD]
    dumped = run.state.model_dump(mode="json", by_alias=True)["chargeback"]
    assert {"disputeId", "status", "amount", "reason", "openedAt", "closedAt"} <= set(dumped)
    assert_consistent(run)


@pytest.mark.parametrize("role", ["buyer", "seller", "admin", "service", "other user"])
def test_only_the_system_opens_or_closes_a_chargeback(role: str) -> None:
    run = reach("FUNDS_HELD", milestones=False)
    assert code(run, "OpenChargeback", role, opened()) == "NOT_AUTHORIZED"
    run.ok("OpenChargeback", "system", opened())
    assert code(run, "CloseChargeback", role, closed("WON")) == "NOT_AUTHORIZED"


@pytest.mark.parametrize("status", ["AWAIT_FUNDS", "CANCELLED"])
def test_no_chargeback_without_funds(status: str) -> None:
    run = reach(status, milestones=False)
    assert code(run, "OpenChargeback", "system", opened()) == "INVALID_TRANSITION"


def test_open_chargeback_refuses_every_release_refund_and_settlement() -> None:
    run = reach("DELIVERED", milestones=False)
    run.ok("OpenChargeback", "system", opened())
    assert code(run, "ReleaseFunds", "buyer") == "CHARGEBACK_OPEN"
    assert code(run, "ReleaseFunds", "admin") == "CHARGEBACK_OPEN"
    assert code(run, "RefundEscrow", "admin", {"reason": "x"}) == "CHARGEBACK_OPEN"
    assert code(run, "RefundEscrow", "seller", {"reason": "x"}) == "CHARGEBACK_OPEN"
    run.advance(days(400))  # past the auto-refund deadline: the timer's commands too
    assert code(run, "RefundEscrow", "system", {"reason": "TIMEOUT"}) == "CHARGEBACK_OPEN"
    assert code(run, "ReleaseFunds", "system", {"reason": "TIMEOUT"}) == "CHARGEBACK_OPEN"
    # not a money movement: a dispute may still be raised; its resolution may not
    run.ok("RaiseDispute", "buyer", {"reason": "late"})
    resolve = {"resolution": "REFUND", "reason": "x"}
    assert code(run, "ResolveDispute", "admin", resolve) == "CHARGEBACK_OPEN"
    assert run.state is not None and run.state.settlement is None
    assert_consistent(run)


def test_open_chargeback_refuses_milestone_release_and_resume() -> None:
    run = reach("FUNDS_HELD")  # m1 delivered
    run.ok("OpenChargeback", "system", opened())
    assert code(run, "ReleaseMilestone", "buyer", {"milestoneId": "m1"}) == "CHARGEBACK_OPEN"
    run.ok("DeliverMilestone", "seller", {"milestoneId": "m2"})
    resume = {"settlementId": "escrow-release:esc-1:all:1"}
    assert code(run, "ResumeSettlement", "system", resume) == "CHARGEBACK_OPEN"


def test_timer_sends_nothing_while_a_chargeback_is_open() -> None:
    run = reach("DELIVERED", milestones=False)
    run.ok("OpenChargeback", "system", opened())
    assert run.state is not None and run.state.auto_refund_at is not None
    later = run.state.auto_refund_at + days(1)
    assert timeout_command_for(run.state, later, DomainSettings()) is None
    run.ok("CloseChargeback", "system", closed("WON"))
    due = timeout_command_for(run.state, later, DomainSettings())
    assert due is not None and due.type == "RefundEscrow"


def test_repeated_open_is_a_no_op_and_another_dispute_is_refused() -> None:
    run = reach("FUNDS_HELD", milestones=False)
    run.ok("OpenChargeback", "system", opened())
    again = run.send("OpenChargeback", "system", opened())
    assert again.accepted and again.events == []
    assert code(run, "OpenChargeback", "system", opened("dp_2")) == "INVALID_TRANSITION"
    assert len(run.events) == 4  # created, instructions, funds held, one ChargebackOpened


def test_open_and_close_are_taken_while_a_settlement_is_pending() -> None:
    run = reach("DELIVERED", pending=True, milestones=False)
    assert run.state is not None and run.state.settlement is not None
    assert code(run, "MarkDelivered", "seller") == "SETTLEMENT_PENDING"
    run.ok("OpenChargeback", "system", opened())
    assert run.state.settlement is not None  # held by the payments agent, still pending
    run.ok("CloseChargeback", "system", closed("WON"))
    assert run.state.settlement is not None and run.state.status is EscrowStatus.DELIVERED
    assert_consistent(run)


def test_settlement_results_still_land_while_a_chargeback_is_open() -> None:
    run = reach("DELIVERED", pending=True, milestones=False)
    run.ok("OpenChargeback", "system", opened())
    failure = payload_for("RecordSettlementFailure", "system", run.state)
    run.ok("RecordSettlementFailure", "system", failure)
    assert run.state is not None and run.state.settlement is None
    assert code(run, "ReleaseFunds", "buyer") == "CHARGEBACK_OPEN"
    assert_consistent(run)


def test_won_continues_the_escrow() -> None:
    run = reach("DELIVERED", milestones=False)
    run.ok("OpenChargeback", "system", opened())
    (event,) = run.ok("CloseChargeback", "system", closed("WON")).events
    assert event.type == "ChargebackClosed"
    assert run.state is not None and run.state.status is EscrowStatus.DELIVERED
    assert run.state.chargeback is not None
    assert run.state.chargeback.status is ChargebackStatus.WON
    assert run.state.chargeback.closed_at == run.now
    run.ok("ReleaseFunds", "buyer")
    run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "system", run.state))
    assert run.state.status is EscrowStatus.RELEASED
    assert_consistent(run)


@pytest.mark.parametrize("status", ["FUNDS_HELD", "DELIVERED", "DISPUTED"])
def test_lost_on_held_funds_ends_refunded_by_the_network(status: str) -> None:
    run = reach(status, milestones=False)
    run.ok("OpenChargeback", "system", opened())
    (event,) = run.ok("CloseChargeback", "system", closed("LOST")).events
    assert event.type == "EscrowRefunded"
    assert event.data.model_dump(by_alias=True) == {
        "provider": "stripe",
        "providerReference": DISPUTE,
        "attempt": 1,
        "amount": AMOUNT,
        "reason": "CHARGEBACK",
    }
    state = run.state
    assert state is not None and state.status is EscrowStatus.REFUNDED
    assert state.refunded_amount == AMOUNT and state.holding_amount == 0
    assert state.chargeback is not None and state.chargeback.status is ChargebackStatus.LOST
    assert state.ledger[-1].kind is PostingKind.CHARGEBACK_REFUND
    balances = ledger_balances(state)
    assert balances[HOLDING] == 0 and balances[f"buyer:{BUYER_ID}"] == AMOUNT
    assert balances.get(PLATFORM_CHARGEBACKS_ACCOUNT, 0) == 0
    assert_consistent(run)


def test_lost_clears_a_pending_settlement_without_any_refund_requested() -> None:
    run = reach("DISPUTED", pending=True, milestones=False)  # a REFUND pending
    run.ok("OpenChargeback", "system", opened())
    (event,) = run.ok("CloseChargeback", "system", closed("LOST")).events
    assert event.type == "EscrowRefunded" and event.data.reason == "CHARGEBACK"
    assert run.state is not None and run.state.settlement is None
    assert run.state.status is EscrowStatus.REFUNDED
    assert [e.type for e in run.events].count("SettlementRequested") == 1
    # a late result of that settlement is refused: nothing is pending any more
    late = {
        "settlementId": "escrow-refund:esc-1:all:1",
        "provider": "stripe",
        "providerReference": "re_1",
        "amount": str(AMOUNT),
    }
    assert code(run, "ConfirmSettlement", "system", late) == "SETTLEMENT_MISMATCH"
    assert_consistent(run)


def test_after_release_the_chargeback_is_ledger_only() -> None:
    run = reach("RELEASED", milestones=False)
    (event,) = run.ok("OpenChargeback", "system", opened()).events
    assert event.type == "ChargebackOpened"
    state = run.state
    assert state is not None and state.status is EscrowStatus.RELEASED
    assert state.settlement is None
    assert state.ledger[-1].kind is PostingKind.CHARGEBACK
    balances = ledger_balances(state)
    assert balances[PLATFORM_CHARGEBACKS_ACCOUNT] == -AMOUNT
    assert balances[SELLER_RECEIVABLE] == AMOUNT
    assert_consistent(run)

    (won,) = run.ok("CloseChargeback", "system", closed("WON")).events
    assert won.type == "ChargebackClosed"
    assert run.state is not None and run.state.ledger[-1].kind is PostingKind.CHARGEBACK_REVERSED
    balances = ledger_balances(run.state)
    assert balances[PLATFORM_CHARGEBACKS_ACCOUNT] == 0 and balances[SELLER_RECEIVABLE] == 0
    assert run.state.status is EscrowStatus.RELEASED
    assert_consistent(run)


def test_lost_after_release_keeps_the_receivable() -> None:
    run = reach("RELEASED", milestones=False)
    run.ok("OpenChargeback", "system", opened())
    postings = len(run.state.ledger) if run.state else 0
    (lost,) = run.ok("CloseChargeback", "system", closed("LOST")).events
    assert lost.type == "ChargebackClosed" and lost.data.outcome.value == "LOST"
    state = run.state
    assert state is not None and state.status is EscrowStatus.RELEASED
    assert len(state.ledger) == postings  # nothing more booked
    assert ledger_balances(state)[SELLER_RECEIVABLE] == AMOUNT
    assert state.chargeback is not None and state.chargeback.status is ChargebackStatus.LOST
    assert_consistent(run)


def test_after_a_refund_the_buyer_owes_it() -> None:
    run = reach("REFUNDED", milestones=False)
    run.ok("OpenChargeback", "system", opened())
    assert run.state is not None and run.state.status is EscrowStatus.REFUNDED
    balances = ledger_balances(run.state)
    assert balances[BUYER_RECEIVABLE] == AMOUNT
    assert SELLER_RECEIVABLE not in balances
    assert_consistent(run)
    run.ok("CloseChargeback", "system", closed("LOST"))
    assert_consistent(run)


def test_funds_released_while_open_are_booked_when_lost() -> None:
    run = reach("DELIVERED", pending=True, milestones=False)  # a RELEASE pending (in flight)
    run.ok("OpenChargeback", "system", opened())
    run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "system", run.state))
    assert run.state is not None and run.state.status is EscrowStatus.RELEASED
    assert_consistent(run)
    run.ok("CloseChargeback", "system", closed("LOST"))
    assert ledger_balances(run.state)[SELLER_RECEIVABLE] == AMOUNT
    assert_consistent(run)


def test_partly_released_milestones_book_the_uncovered_part() -> None:
    run = reach("FUNDS_HELD")  # m1 (6000) delivered
    run.ok("ReleaseMilestone", "buyer", {"milestoneId": "m1"})
    run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "system", run.state))
    run.ok("OpenChargeback", "system", opened())
    assert run.state is not None
    assert ledger_balances(run.state)[SELLER_RECEIVABLE] == 6000
    assert_consistent(run)
    (event,) = run.ok("CloseChargeback", "system", closed("LOST")).events
    assert event.type == "EscrowRefunded" and event.data.amount == 4000
    assert run.state.status is EscrowStatus.REFUNDED
    assert_consistent(run)


def test_close_needs_the_open_chargeback() -> None:
    run = reach("FUNDS_HELD", milestones=False)
    assert code(run, "CloseChargeback", "system", closed("WON")) == "INVALID_TRANSITION"
    run.ok("OpenChargeback", "system", opened())
    assert code(run, "CloseChargeback", "system", closed("WON", "dp_9")) == "INVALID_TRANSITION"
    run.ok("CloseChargeback", "system", closed("WON"))
    again = run.send("CloseChargeback", "system", closed("WON"))
    assert again.accepted and again.events == []
    assert code(run, "CloseChargeback", "system", closed("LOST")) == "INVALID_TRANSITION"


def test_open_payload_must_fit_the_payment() -> None:
    run = reach("FUNDS_HELD", milestones=False)
    too_much = opened(amount=AMOUNT + 1)
    assert code(run, "OpenChargeback", "system", too_much) == "VALIDATION_FAILED"
    other_currency = opened(currency="USDC")
    assert code(run, "OpenChargeback", "system", other_currency) == "VALIDATION_FAILED"
    custodian = opened(provider="custodian")
    assert code(run, "OpenChargeback", "system", custodian) == "VALIDATION_FAILED"


def test_no_card_chargeback_on_a_usdc_escrow() -> None:
    run = Run()
    run.ok(
        "CreateEscrow",
        "buyer",
        create_payload(milestones=False, rail="USDC_BASE", currency="USDC"),
    )
    run.ok(
        "RecordPaymentInstructions",
        "system",
        {"provider": "custodian", "providerPaymentId": "dep-1", "depositAddress": "0xabc"},
    )
    funds = {
        "provider": "custodian",
        "providerPaymentId": "dep-1",
        "amount": str(AMOUNT),
        "currency": "USDC",
    }
    run.ok("ConfirmFunds", "system", funds)
    usdc = opened(currency="USDC")
    assert code(run, "OpenChargeback", "system", usdc) == "VALIDATION_FAILED"


def test_chargeback_commands_and_events_round_trip_on_the_wire() -> None:
    run = reach("RELEASED", milestones=False)
    sent = [
        run.ok("OpenChargeback", "system", opened()),
        run.ok("CloseChargeback", "system", {**closed("LOST"), "amount": str(AMOUNT)}),
    ]
    for event in [e for decision in sent for e in decision.events]:
        wire = json.loads(event.model_dump_json(by_alias=True))
        assert parse_event(wire) == event
    original = command("OpenChargeback", "c-rt", "system", opened())
    assert parse_command(json.loads(original.model_dump_json(by_alias=True))) == original
