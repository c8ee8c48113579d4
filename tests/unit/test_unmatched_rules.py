"""Money no escrow accepts (SPEC §10), the pure parts: what a refused ConfirmFunds carries,
which refusals are money to send back, when a flagged deposit cancels its escrow, and which
events ask for a PaymentIntent's cancellation."""

from __future__ import annotations

from typing import Any

import pytest

from escrow_stream.agents.effect_rules import wanted_effect
from escrow_stream.agents.unmatched import refused_payment
from escrow_stream.db.effects import EffectKind
from escrow_stream.db.unmatched import FundsStatus, is_return_key, return_key
from escrow_stream.web.webhooks import stripe_return
from tests.unit.domain_support import AMOUNT, ESCROW_ID, Run, create_payload, reach

FUNDS = {
    "provider": "stripe",
    "providerPaymentId": "pi_2",
    "amount": str(AMOUNT),
    "currency": "USD",
}


def test_a_refused_confirm_funds_carries_its_payment_and_others_carry_none() -> None:
    run = reach("CANCELLED")
    rejection = run.send("ConfirmFunds", "system", FUNDS).rejection
    assert rejection is not None and rejection.code == "INVALID_TRANSITION"
    assert rejection.payment is not None
    wire = rejection.model_dump(mode="json", by_alias=True)
    assert wire["payment"] == {
        "provider": "stripe",
        "providerPaymentId": "pi_2",
        "amount": str(AMOUNT),
        "currency": "USD",
        "senderAddress": None,
    }
    other = reach("FUNDS_HELD").send("CancelEscrow", "buyer", {"reason": "BUYER_CANCELLED"})
    assert other.rejection is not None and other.rejection.payment is None


def _rejection(code: str, **extra: Any) -> dict[str, Any]:
    return {
        "commandId": "stripe:evt_1",
        "type": "ConfirmFunds",
        "escrowId": "esc-1",
        "code": code,
        "message": "m",
        "payment": FUNDS,
        **extra,
    }


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("INVALID_TRANSITION", FundsStatus.RETURNING),
        ("AMOUNT_MISMATCH", FundsStatus.RETURNING),
        ("VALIDATION_FAILED", FundsStatus.RETURNING),
        ("SETTLEMENT_PENDING", FundsStatus.RETURNING),
        ("NOT_FOUND", FundsStatus.NEEDS_REVIEW),  # another deployment's escrow? a person looks
    ],
)
def test_money_refusals_are_returned_or_reviewed(code: str, status: FundsStatus) -> None:
    refused = refused_payment(_rejection(code))
    assert refused is not None
    payment, got_code, got_status = refused
    assert (payment, got_code.value, got_status) == (FUNDS, code, status)


@pytest.mark.parametrize(
    "rejection",
    [
        _rejection("NOT_AUTHORIZED"),  # unsigned: its payload is nobody's word
        _rejection("COMMAND_ID_REUSED"),
        _rejection("NO_SUCH_CODE"),
        _rejection("INVALID_TRANSITION", type="CancelEscrow"),
        _rejection("INVALID_TRANSITION", payment=None),
    ],
)
def test_refusals_that_are_not_money_are_left_alone(rejection: dict[str, Any]) -> None:
    assert refused_payment(rejection) is None


def _compliance(amount: int, currency: str = "USD") -> dict[str, str]:
    return {
        "reason": "COMPLIANCE_REJECTED",
        "providerPaymentId": "dpt-1",
        "amount": str(amount),
        "currency": currency,
    }


def test_a_flagged_deposit_cancels_only_the_escrow_it_would_fund() -> None:
    run = reach("AWAIT_FUNDS")
    for refused in (_compliance(1), _compliance(AMOUNT + 1), _compliance(AMOUNT, "USDC")):
        decision = run.send("CancelEscrow", "system", refused)
        assert decision.rejection is not None and decision.rejection.code == "AMOUNT_MISMATCH"
        assert "frozen alone" in decision.rejection.message
    assert run.state is not None and run.state.status == "AWAIT_FUNDS"
    run.ok("CancelEscrow", "system", _compliance(AMOUNT))
    assert run.state.status == "CANCELLED"
    assert run.state.cancellation_reason == "COMPLIANCE_REJECTED"


def test_a_flagged_deposit_after_funding_cancels_nothing() -> None:
    decision = reach("FUNDS_HELD").send("CancelEscrow", "system", _compliance(AMOUNT))
    assert decision.rejection is not None and decision.rejection.code == "INVALID_TRANSITION"


def test_cancelling_an_unfunded_stripe_escrow_asks_to_cancel_its_intent() -> None:
    run = Run()
    run.ok("CreateEscrow", "buyer", create_payload(milestones=False))
    run.ok(
        "RecordPaymentInstructions", "system", {"provider": "stripe", "providerPaymentId": "pi_1"}
    )
    run.ok("CancelEscrow", "buyer", {"reason": "BUYER_CANCELLED"})
    wanted = wanted_effect(run.events[-1])
    assert wanted == (f"cancel-instructions:{ESCROW_ID}", EffectKind.CANCEL_INSTRUCTIONS)
    # before its instructions were recorded: the agent finds the intent in its own effects
    early = Run()
    early.ok("CreateEscrow", "buyer", create_payload(milestones=False))
    early.ok("CancelEscrow", "buyer", {"reason": "BUYER_CANCELLED"})
    assert wanted_effect(early.events[-1]) == wanted
    usdc = Run()
    usdc.ok(
        "CreateEscrow", "buyer", create_payload(milestones=False, rail="USDC_BASE", currency="USDC")
    )
    usdc.ok("CancelEscrow", "buyer", {"reason": "BUYER_CANCELLED"})
    assert wanted_effect(usdc.events[-1]) is None
    assert wanted_effect(reach("REFUNDED").events[-1]) is None


def test_return_keys_name_the_funds() -> None:
    key = return_key("custodian:dpt-1")
    assert key == "unmatched:custodian:dpt-1" and is_return_key(key)
    assert not is_return_key("escrow-refund:esc-1:all:1")


def _stripe(kind: str, **obj: Any) -> dict[str, Any]:
    return {"id": "evt_1", "type": kind, "data": {"object": obj}}


def test_stripe_confirms_or_refuses_our_returns_only() -> None:
    key = "unmatched:stripe:pi_1"
    assert stripe_return(_stripe("charge.refunded", refunded=True, payment_intent="pi_1")) == (
        key,
        True,
        "",
        None,
    )
    partly = _stripe("charge.refunded", refunded=False, payment_intent="pi_1")
    assert stripe_return(partly) is None
    ours = {"unmatched_funds_id": "stripe:pi_1"}
    done = _stripe("refund.updated", id="re_1", status="succeeded", metadata=ours)
    assert stripe_return(done) == (key, True, "", "re_1")
    failed = _stripe(
        "refund.updated",
        id="re_1",
        status="failed",
        failure_reason="lost_or_stolen_card",
        metadata=ours,
    )
    assert stripe_return(failed) == (key, False, "refund re_1: lost_or_stolen_card", "re_1")
    pending = _stripe("refund.updated", id="re_1", status="pending", metadata=ours)
    assert stripe_return(pending) is None
    settlement = _stripe(
        "refund.updated", id="re_2", status="succeeded", metadata={"escrow_id": "e"}
    )
    assert stripe_return(settlement) is None  # a settlement's refund: the escrow's business
