"""Where settlements pay (SPEC §10): the seller's ACTIVE account, awaiting it, resuming, KYC."""

from __future__ import annotations

from typing import Any

from domain_support import (
    AMOUNT,
    BUYER_ID,
    SELLER_ACCOUNT,
    SELLER_ID,
    Run,
    create_payload,
    days,
    fold,
    payload_for,
    reach,
)

from escrow_stream.agents.timeouts import due_timeouts
from escrow_stream.domain import (
    BuyerDestination,
    DecisionContext,
    DomainSettings,
    SettlementStatus,
    StripeAccountDestination,
    WalletDestination,
    timeout_command_for,
)
from escrow_stream.tables import escrows as escrow_table

NO_ACCOUNT = DecisionContext()
WALLET = "0x" + "ab" * 20
SENDER = "0x" + "cd" * 20
REFUND_WALLET = "0x" + "ef" * 20


def delivered(context: DecisionContext | None = NO_ACCOUNT) -> Run:
    """A funded, delivered STRIPE escrow (no milestones) whose seller has ``context``."""
    run = reach("DELIVERED", milestones=False)
    run.context = context
    return run


def resume(run: Run, **overrides: Any) -> Any:
    assert run.state is not None and run.state.settlement is not None
    payload = {"settlementId": run.state.settlement.settlement_id, **overrides}
    return run.send("ResumeSettlement", "system", payload)


def code(decision: Any) -> str:
    assert decision.rejection is not None, decision.events
    return str(decision.rejection.code)


def test_a_release_pays_the_sellers_active_account_recorded_when_requested() -> None:
    run = delivered(DecisionContext(seller_payout=StripeAccountDestination(account_id="acct_9")))
    event = run.ok("ReleaseFunds", "buyer").events[0]
    assert event.type == "SettlementRequested"
    data = event.model_dump(mode="json", by_alias=True)["data"]
    assert data["status"] == "PENDING"
    assert data["destination"] == {"type": "stripe_account", "accountId": "acct_9"}
    settlement = run.state.settlement if run.state else None
    assert settlement is not None and settlement.status is SettlementStatus.PENDING
    assert settlement.destination == StripeAccountDestination(account_id="acct_9")


def test_without_an_active_account_the_release_waits_and_nothing_settles_it() -> None:
    run = delivered()
    event = run.ok("ReleaseFunds", "buyer").events[0]
    snapshot = event.model_dump(mode="json", by_alias=True)["escrow"]["settlement"]
    assert snapshot["status"] == "AWAITING_PAYOUT_ACCOUNT"
    assert snapshot.get("destination") is None
    state = run.state
    assert state is not None
    # nothing was sent to a provider: a result for it is refused
    confirm = payload_for("ConfirmSettlement", "system", state)
    assert code(run.send("ConfirmSettlement", "system", confirm)) == "INVALID_TRANSITION"
    failure = payload_for("RecordSettlementFailure", "system", state)
    assert code(run.send("RecordSettlementFailure", "system", failure)) == "INVALID_TRANSITION"
    # no other command slips in, and no timer refunds it, however late
    assert code(run.send("RefundEscrow", "seller", {"reason": "x"})) == "SETTLEMENT_PENDING"
    for action in ("refund", "release"):
        rules = DomainSettings(delivered_timeout_action=action)
        assert timeout_command_for(state, state.updated_at + days(365), rules) is None
    assert run.state == state


def test_an_account_for_another_rail_is_no_account() -> None:
    run = delivered(DecisionContext(seller_payout=WalletDestination(address=WALLET)))
    run.ok("ReleaseFunds", "buyer")
    assert run.state is not None and run.state.settlement is not None
    assert run.state.settlement.status is SettlementStatus.AWAITING_PAYOUT_ACCOUNT


def test_resume_records_the_destination_and_requests_the_same_settlement_again() -> None:
    run = delivered()
    run.ok("ReleaseFunds", "buyer")
    assert run.state is not None and run.state.settlement is not None
    waiting = run.state.settlement

    assert code(resume(run)) == "INVALID_TRANSITION"  # still no ACTIVE account
    run.context = DecisionContext(seller_payout=StripeAccountDestination(account_id=SELLER_ACCOUNT))
    assert code(resume(run, settlementId="escrow-release:other:all:1")) == "VALIDATION_FAILED"
    not_system = {"settlementId": waiting.settlement_id}
    assert code(run.send("ResumeSettlement", "admin", not_system)) == "NOT_AUTHORIZED"

    decision = resume(run)
    assert decision.rejection is None
    (event,) = decision.events
    assert event.type == "SettlementRequested"
    resumed = run.state.settlement
    assert resumed is not None
    assert resumed.status is SettlementStatus.PENDING
    assert resumed.destination == StripeAccountDestination(account_id=SELLER_ACCOUNT)
    same = ("settlement_id", "kind", "attempt", "amount", "payout_amount", "fee_amount", "reason")
    assert {f: getattr(resumed, f) for f in same} == {f: getattr(waiting, f) for f in same}
    assert run.state.settlement_attempts == 1

    assert code(resume(run)) == "INVALID_TRANSITION"  # only an awaiting one resumes
    confirm = payload_for("ConfirmSettlement", "system", run.state)
    run.ok("ConfirmSettlement", "system", confirm)
    assert run.state.status.value == "RELEASED"
    assert fold(run.events) == run.state


def test_a_repeated_resume_is_the_same_command_applied_once() -> None:
    run = delivered()
    run.ok("ReleaseFunds", "buyer")
    assert run.state is not None and run.state.settlement is not None
    run.context = DecisionContext(seller_payout=StripeAccountDestination(account_id=SELLER_ACCOUNT))
    payload = {"settlementId": run.state.settlement.settlement_id}
    first = run.send("ResumeSettlement", "system", payload, command_id="resume-1")
    again = run.send("ResumeSettlement", "system", payload, command_id="resume-1")
    assert again.duplicate and [e.event_id for e in again.events] == [
        e.event_id for e in first.events
    ]


def test_refunds_pay_the_buyer() -> None:
    stripe = reach("FUNDS_HELD", milestones=False)
    stripe.ok("RefundEscrow", "admin", {"reason": "cannot deliver"})
    assert stripe.state is not None and stripe.state.settlement is not None
    assert stripe.state.settlement.destination == BuyerDestination()
    assert stripe.state.settlement.status is SettlementStatus.PENDING

    for extra, expected in (({}, SENDER), ({"buyerWalletAddress": REFUND_WALLET}, REFUND_WALLET)):
        run = Run()
        usdc = {"rail": "USDC_BASE", "currency": "USDC", "sellerAccountId": None, **extra}
        run.ok("CreateEscrow", "buyer", create_payload(milestones=False, **usdc))
        funds = {
            "provider": "custodian",
            "providerPaymentId": "dpt_1",
            "amount": str(AMOUNT),
            "currency": "USDC",
            "senderAddress": SENDER,
        }
        run.ok("ConfirmFunds", "system", funds)
        run.ok("RefundEscrow", "admin", {"reason": "cannot deliver"})
        assert run.state is not None and run.state.settlement is not None
        assert run.state.settlement.destination == WalletDestination(address=expected)


def test_a_usdc_release_pays_the_sellers_wallet() -> None:
    run = Run()
    usdc = {"rail": "USDC_BASE", "currency": "USDC", "sellerAccountId": None}
    run.ok("CreateEscrow", "buyer", create_payload(milestones=False, **usdc))
    funds = {
        "provider": "custodian",
        "providerPaymentId": "dpt_1",
        "amount": str(AMOUNT),
        "currency": "USDC",
        "senderAddress": SENDER,
    }
    run.ok("ConfirmFunds", "system", funds)
    run.ok("MarkDelivered", "seller", {})
    run.context = DecisionContext(seller_payout=WalletDestination(address=WALLET))
    run.ok("ReleaseFunds", "buyer")
    assert run.state is not None and run.state.settlement is not None
    assert run.state.settlement.destination == WalletDestination(address=WALLET)


def test_no_timer_refunds_an_escrow_whose_release_was_approved_and_failed() -> None:
    run = delivered(DecisionContext(seller_payout=StripeAccountDestination(account_id="acct_9")))
    run.ok("ReleaseFunds", "buyer")
    failure = payload_for("RecordSettlementFailure", "system", run.state)
    run.ok("RecordSettlementFailure", "system", failure)
    state = run.state
    assert state is not None and state.settlement is None and state.status.value == "DELIVERED"
    assert state.auto_refund_at is not None and state.release_approved_at is not None
    late = state.auto_refund_at + days(1)
    assert timeout_command_for(state, late, DomainSettings()) is None
    # an escrow whose release was never asked for is still refunded on time
    other = delivered()
    assert other.state is not None and other.state.auto_refund_at is not None
    due = timeout_command_for(other.state, other.state.auto_refund_at + days(1), DomainSettings())
    assert due is not None and due.type == "RefundEscrow"


# --- KYC on every release path ------------------------------------------------------------

GATED = DomainSettings(feature_kyc_gating=True)
BOTH = frozenset({BUYER_ID, SELLER_ID})
ACCOUNT = StripeAccountDestination(account_id=SELLER_ACCOUNT)


def gated_run(status: str) -> Run:
    """An escrow reached with gating on and both parties verified."""
    run = Run(GATED)
    run.context = DecisionContext(kyc_verified_user_ids=BOTH, seller_payout=ACCOUNT)
    run.ok("CreateEscrow", "buyer", create_payload())
    run.ok("ConfirmFunds", "system", {**(payload_for("ConfirmFunds", "system", None) or {})})
    run.ok("DeliverMilestone", "seller", {"milestoneId": "m1"})
    if status == "DISPUTED":
        run.ok("RaiseDispute", "buyer", {"reason": "late"})
    return run


def test_milestone_release_needs_both_parties_verified() -> None:
    run = gated_run("FUNDS_HELD")
    only_buyer = DecisionContext(kyc_verified_user_ids=frozenset({BUYER_ID}), seller_payout=ACCOUNT)
    release = {"milestoneId": "m1"}
    assert code(run.send("ReleaseMilestone", "buyer", release, only_buyer)) == "KYC_REQUIRED"
    decision = run.send("ReleaseMilestone", "buyer", release)
    assert decision.rejection is None and decision.events[0].type == "SettlementRequested"


def test_dispute_release_needs_both_parties_verified_refund_does_not() -> None:
    run = gated_run("DISPUTED")
    nobody = DecisionContext(seller_payout=ACCOUNT)
    release = {"resolution": "RELEASE", "reason": "delivered"}
    assert code(run.send("ResolveDispute", "admin", release, nobody)) == "KYC_REQUIRED"
    assert run.send("ResolveDispute", "admin", release).rejection is None

    refunded = gated_run("DISPUTED")
    refund = {"resolution": "REFUND", "reason": "late"}
    assert refunded.send("ResolveDispute", "admin", refund, nobody).rejection is None


def test_the_timeout_scan_sends_nothing_for_a_release_awaiting_its_account() -> None:
    run = delivered()
    run.ok("ReleaseFunds", "buyer")
    assert run.state is not None and run.state.auto_refund_at is not None
    late = run.state.auto_refund_at + days(30)
    for action in ("refund", "release"):
        rules = DomainSettings(delivered_timeout_action=action)
        assert due_timeouts([escrow_table.dump(run.state)], late, rules) == []


def test_an_admin_may_refund_a_release_whose_seller_never_onboards() -> None:
    run = delivered()
    run.ok("ReleaseFunds", "buyer")
    assert run.state is not None and run.state.settlement is not None
    waiting = run.state.settlement
    refund = {"reason": "seller never set up payouts"}
    assert code(run.send("RefundEscrow", "seller", refund)) == "SETTLEMENT_PENDING"
    decision = run.send("RefundEscrow", "admin", refund)
    assert decision.rejection is None
    replaced = run.state.settlement
    assert replaced is not None
    assert (replaced.kind.value, replaced.attempt, replaced.status) == (
        "REFUND",
        waiting.attempt + 1,
        SettlementStatus.PENDING,
    )
    assert replaced.destination == BuyerDestination()
    # the old release can no longer be resumed, even once the seller onboards
    run.context = DecisionContext(seller_payout=StripeAccountDestination(account_id="acct_9"))
    late = run.send("ResumeSettlement", "system", {"settlementId": waiting.settlement_id})
    assert code(late) == "INVALID_TRANSITION"
    confirm = payload_for("ConfirmSettlement", "system", run.state)
    run.ok("ConfirmSettlement", "system", {**(confirm or {}), "providerReference": "re_1"})
    assert run.state.status.value == "REFUNDED"
    assert fold(run.events) == run.state


def test_an_admin_may_resolve_a_waiting_dispute_release_as_a_refund() -> None:
    run = reach("DISPUTED", milestones=False)
    run.context = NO_ACCOUNT
    run.ok("ResolveDispute", "admin", {"resolution": "RELEASE", "reason": "delivered"})
    assert run.state is not None and run.state.settlement is not None
    assert run.state.settlement.status is SettlementStatus.AWAITING_PAYOUT_ACCOUNT
    again = {"resolution": "RELEASE", "reason": "delivered"}
    assert code(run.send("ResolveDispute", "admin", again)) == "SETTLEMENT_PENDING"
    refund = {"resolution": "REFUND", "reason": "seller unreachable"}
    assert run.send("ResolveDispute", "admin", refund).rejection is None
    assert run.state.settlement is not None and run.state.settlement.kind.value == "REFUND"
