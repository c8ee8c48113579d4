"""SPEC §10 rules of part B: settlement ids and SETTLEMENT_MISMATCH, amount limits, the fee
policy, no client secret in state, and the payments agent's pure decisions."""

from __future__ import annotations

from typing import Any

import pytest
from domain_support import ESCROW_ID, Run, create_payload, payload_for, reach

from escrow_stream.agents.effect_rules import (
    effect_snapshot,
    is_current,
    nothing_to_move,
    refused,
    result_command_id,
    succeeded,
    wanted_effect,
)
from escrow_stream.config import ConfigError, domain_settings, load_settings
from escrow_stream.db.effects import Effect, EffectKind, EffectState
from escrow_stream.domain import (
    DecisionContext,
    DomainSettings,
    Escrow,
    SettlementKind,
    StripeAccountDestination,
)
from escrow_stream.domain.escrow import settlement_id_for
from escrow_stream.domain.money import STRIPE_CHARGE_MAX_MINOR, Currency, policy_fee
from escrow_stream.web.schemas import CreateEscrowBody
from escrow_stream.web.webhooks import stripe_command

PAYOUT = DecisionContext(seller_payout=StripeAccountDestination(account_id="acct_seller"))


def _result(run: Run, type_: str, settlement_id: str, **extra: Any) -> str | None:
    """Send a settlement result naming ``settlement_id``; the rejection code or None."""
    base = payload_for(type_, "system", run.state)
    assert base is not None
    decision = run.send(type_, "system", {**base, "settlementId": settlement_id, **extra})
    return decision.rejection.code.value if decision.rejection else None


# --- settlement identity ------------------------------------------------------------------


def test_settlement_id_is_one_definition() -> None:
    assert settlement_id_for("e1", SettlementKind.RELEASE, None, 1) == "escrow-release:e1:all:1"
    assert settlement_id_for("e1", SettlementKind.REFUND, "m2", 3) == "escrow-refund:e1:m2:3"


def test_requested_settlement_carries_its_id() -> None:
    run = reach("FUNDS_HELD", pending=True)  # an admin refund, attempt 1
    assert run.state is not None and run.state.settlement is not None
    assert run.state.settlement.settlement_id == f"escrow-refund:{ESCROW_ID}:all:1"
    dumped = run.events[-1].model_dump(mode="json", by_alias=True)
    assert dumped["escrow"]["settlement"]["settlementId"] == f"escrow-refund:{ESCROW_ID}:all:1"


def test_late_release_result_never_settles_a_pending_refund() -> None:
    """The issue's case: release attempt 1 failed, refund attempt 2 is pending, and the
    release's transfer.created arrives late."""
    run = reach("DELIVERED")
    assert run.send("ReleaseFunds", "buyer", None, PAYOUT).rejection is None
    assert run.state is not None and run.state.settlement is not None
    release_id = run.state.settlement.settlement_id
    assert release_id == f"escrow-release:{ESCROW_ID}:all:1"
    assert _result(run, "RecordSettlementFailure", release_id) is None
    run.ok("RefundEscrow", "admin", {"reason": "seller cannot be paid"})
    pending = run.state.settlement
    assert pending is not None and pending.settlement_id == f"escrow-refund:{ESCROW_ID}:all:2"
    before = run.state

    late = {"amount": str(before.settlement.payout_amount) if before.settlement else "0"}
    assert _result(run, "ConfirmSettlement", release_id, **late) == "SETTLEMENT_MISMATCH"
    assert _result(run, "RecordSettlementFailure", release_id) == "SETTLEMENT_MISMATCH"
    other_kind = f"escrow-release:{ESCROW_ID}:all:2"
    assert _result(run, "ConfirmSettlement", other_kind, **late) == "SETTLEMENT_MISMATCH"
    assert run.state == before  # the pending refund is untouched

    assert _result(run, "ConfirmSettlement", pending.settlement_id, **late) is None
    assert run.state.status == "REFUNDED" and run.state.settlement is None
    # a second result for the finished settlement: nothing is pending any more
    assert _result(run, "ConfirmSettlement", pending.settlement_id, **late) == (
        "SETTLEMENT_MISMATCH"
    )


def test_milestone_settlement_id_names_the_milestone() -> None:
    run = reach("FUNDS_HELD")  # m1 delivered
    assert run.send("ReleaseMilestone", "buyer", {"milestoneId": "m1"}, PAYOUT).rejection is None
    assert run.state is not None and run.state.settlement is not None
    assert run.state.settlement.settlement_id == f"escrow-release:{ESCROW_ID}:m1:1"
    whole = f"escrow-release:{ESCROW_ID}:all:1"
    amount = {"amount": str(run.state.settlement.payout_amount)}
    assert _result(run, "ConfirmSettlement", whole, **amount) == "SETTLEMENT_MISMATCH"


def test_snapshots_stored_before_settlement_ids_get_theirs() -> None:
    run = reach("FUNDS_HELD", pending=True)
    assert run.state is not None
    stored = run.state.model_dump(mode="json", by_alias=True)
    del stored["settlement"]["settlementId"]
    stored["payment"]["clientSecret"] = "pi_1_secret_old"
    stored["recentCommands"][1]["events"][0]["data"]["clientSecret"] = "pi_1_secret_old"
    upgraded = Escrow.model_validate(stored)
    assert upgraded.settlement is not None
    assert upgraded.settlement.settlement_id == f"escrow-refund:{ESCROW_ID}:all:1"
    assert "secret" not in upgraded.model_dump_json()


# --- client secret --------------------------------------------------------------------------


def test_no_client_secret_in_instructions_or_snapshots() -> None:
    run = reach("AWAIT_FUNDS")
    secret = {"provider": "stripe", "providerPaymentId": "pi_9", "clientSecret": "pi_9_secret"}
    with pytest.raises(ValueError, match="clientSecret"):
        run.send("RecordPaymentInstructions", "system", secret)
    run.ok(
        "RecordPaymentInstructions", "system", {"provider": "stripe", "providerPaymentId": "pi_9"}
    )
    assert run.state is not None and run.state.payment is not None
    assert "clientSecret" not in run.events[-1].model_dump_json(by_alias=True)


def test_payment_failure_without_a_provider_payment() -> None:
    run = reach("AWAIT_FUNDS")
    failure = {"provider": "stripe", "errorCode": "amount_too_large", "errorMessage": "no"}
    run.ok("RecordPaymentFailure", "system", failure)
    assert run.state is not None and run.state.payment is not None
    assert run.state.payment.last_error_code == "amount_too_large"
    assert run.state.status == "AWAIT_FUNDS"


# --- limits and fees --------------------------------------------------------------------------


def _create(settings: DomainSettings, **payload: Any) -> str | None:
    run = Run(settings)
    decision = run.send("CreateEscrow", "buyer", create_payload(milestones=False, **payload))
    return decision.rejection.code.value if decision.rejection else None


def test_stripe_escrows_stop_at_stripes_largest_charge() -> None:
    generous = DomainSettings(max_amount_minor={Currency.USD: 10**12, Currency.USDC: 10**15})
    assert _create(generous, amount=str(STRIPE_CHARGE_MAX_MINOR), sellerFee="0") is None
    over = str(STRIPE_CHARGE_MAX_MINOR + 1)
    assert _create(generous, amount=over, sellerFee="0") == "VALIDATION_FAILED"
    usdc = {"rail": "USDC_BASE", "currency": "USDC", "sellerFee": "0"}
    assert _create(generous, amount=over, **usdc) is None  # the custodian has no such cap


def test_limits_are_per_currency() -> None:
    settings = DomainSettings(max_amount_minor={Currency.USD: 5_000, Currency.USDC: 7_000_000})
    usdc = {"rail": "USDC_BASE", "currency": "USDC", "sellerFee": "0"}
    assert _create(settings, amount="5000", sellerFee="0") is None
    assert _create(settings, amount="5001", sellerFee="0") == "VALIDATION_FAILED"
    assert _create(settings, amount="7000000", **usdc) is None
    assert _create(settings, amount="7000001", **usdc) == "VALIDATION_FAILED"


def test_fee_comes_from_policy_rounded_down_unless_given() -> None:
    assert policy_fee(10_001, 250) == 250  # 250.025 → 250
    assert policy_fee(399, 250) == 9  # 9.975 → 9
    run = Run(DomainSettings(fee_bps=250))
    payload = create_payload(milestones=False, amount="10001")
    del payload["sellerFee"]
    run.ok("CreateEscrow", "buyer", payload)
    assert run.state is not None and run.state.seller_fee == 250
    explicit = Run(DomainSettings(fee_bps=250))
    explicit.ok("CreateEscrow", "service", create_payload(milestones=False, sellerFee="10000"))
    assert explicit.state is not None and explicit.state.seller_fee == 10_000  # = amount: allowed


def test_http_body_names_the_payout_fields_its_sender_may_not_set() -> None:
    base = {
        "offerId": "o",
        "contractId": "c",
        "rail": "STRIPE",
        "amount": "100",
        "currency": "USD",
        "sellerId": "s",
    }
    both = CreateEscrowBody.model_validate(
        {**base, "sellerFee": "5", "sellerAccountId": "acct_x"}, context={"wire": True}
    )
    assert both.refused_payout_fields(is_service=False) == ["sellerAccountId", "sellerFee"]
    assert both.refused_payout_fields(is_service=True) == ["sellerAccountId"]
    plain = CreateEscrowBody.model_validate(base, context={"wire": True})
    assert plain.refused_payout_fields(is_service=False) == []


# --- webhooks and the payments agent's decisions -------------------------------------------


def test_transfer_created_confirms_the_settlement_in_its_metadata() -> None:
    sid = "escrow-release:e1:all:1"
    event = {
        "id": "evt_1",
        "type": "transfer.created",
        "data": {"object": {"id": "tr_1", "amount": 9500, "metadata": {"escrow_id": "e1"}}},
    }
    assert stripe_command(event) is None  # names no settlement: not ours
    event["data"]["object"]["metadata"]["settlement_key"] = sid
    mapped = stripe_command(event)
    assert mapped is not None
    assert mapped[0] == "ConfirmSettlement" and mapped[2]["settlementId"] == sid
    assert mapped[3] == f"payments:settled:{sid}"


def test_the_agent_acts_on_pending_settlements_only() -> None:
    run = reach("FUNDS_HELD", pending=True)  # an admin refund, PENDING
    requested = run.events[-1]
    assert requested.escrow.settlement is not None
    assert wanted_effect(requested) == (
        requested.escrow.settlement.settlement_id,
        EffectKind.SETTLEMENT,
    )
    assert wanted_effect(run.events[0]) == (f"instructions:{ESCROW_ID}", EffectKind.INSTRUCTIONS)
    waiting = reach("DELIVERED", milestones=False)
    waiting.context = None  # the seller has no ACTIVE payout account
    waiting.ok("ReleaseFunds", "buyer", {})
    assert waiting.state is not None and waiting.state.settlement is not None
    assert waiting.state.settlement.status == "AWAITING_PAYOUT_ACCOUNT"
    assert wanted_effect(waiting.events[-1]) is None


def test_an_old_event_is_not_current_once_the_mirror_moved_on() -> None:
    run = reach("FUNDS_HELD", pending=True)
    event = run.events[-1]
    assert event.escrow.settlement is not None
    key = event.escrow.settlement.settlement_id
    assert is_current(event, key, EffectKind.SETTLEMENT, None)
    assert is_current(event, key, EffectKind.SETTLEMENT, (event.version, event.escrow))
    run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "system", run.state))
    assert run.state is not None and run.state.settlement is None
    assert not is_current(event, key, EffectKind.SETTLEMENT, (run.state.version, run.state))
    other = event.escrow.settlement.model_copy(update={"settlement_id": f"{key}-other"})
    newer = event.escrow.model_copy(update={"version": event.version + 2, "settlement": other})
    assert not is_current(event, key, EffectKind.SETTLEMENT, (newer.version, newer))
    resumed = event.escrow.model_copy(update={"version": event.version + 1})
    assert is_current(event, key, EffectKind.SETTLEMENT, (resumed.version, resumed))
    created = run.events[0]
    instructed = run.events[1].escrow  # RecordPaymentInstructions: payment recorded
    assert not is_current(
        created, f"instructions:{ESCROW_ID}", EffectKind.INSTRUCTIONS, (2, instructed)
    )


def _effect(kind: EffectKind, key: str) -> Effect:
    return Effect(
        key, "e1", "t.commands", kind, "STRIPE", "stripe", 1, {"escrow": {"escrowId": "e1"}}
    )


def test_outcomes_become_commands_naming_the_settlement() -> None:
    settlement = _effect(EffectKind.SETTLEMENT, "escrow-refund:e1:all:2")
    answer = {"provider": "stripe", "providerReference": "re_1", "amount": "10000"}
    done = succeeded(settlement, answer)
    assert done.result_type == "ConfirmSettlement" and done.provider_object_id == "re_1"
    assert done.result_payload == {**answer, "settlementId": "escrow-refund:e1:all:2"}
    assert result_command_id(settlement, done.state) == "payments:settled:escrow-refund:e1:all:2"
    assert succeeded(settlement, None).result_type is None  # the custodian's webhook confirms
    failed = refused(settlement, "account_invalid", "No such destination")
    assert failed.state is EffectState.FAILED and failed.result_type == "RecordSettlementFailure"
    assert failed.result_payload is not None
    assert failed.result_payload["settlementId"] == "escrow-refund:e1:all:2"
    assert failed.result_payload["retryable"] is False

    instructions = _effect(EffectKind.INSTRUCTIONS, "instructions:e1")
    made = succeeded(
        instructions,
        {"provider": "stripe", "providerPaymentId": "pi_1", "clientSecret": "pi_1_secret_2"},
    )
    assert made.client_secret == "pi_1_secret_2"
    assert made.result_payload == {"provider": "stripe", "providerPaymentId": "pi_1"}
    refusal = refused(instructions, "amount_too_large", "Amount must be no more than $999,999.99")
    assert refusal.result_type == "RecordPaymentFailure"
    assert result_command_id(instructions, refusal.state) == "payments:instructions-failed:e1"


def test_limits_and_fee_come_from_the_environment() -> None:
    legacy = domain_settings(load_settings({"ESCROW_MAX_AMOUNT_MINOR": "5000"}))
    assert legacy.max_amount_for(Currency.USD) == 5_000  # the older variable: the USD limit
    assert legacy.max_amount_for(Currency.USDC) == 10_000_000_000_000
    assert legacy.fee_bps == 0
    env = {
        "ESCROW_MAX_AMOUNT_MINOR": "5000",
        "ESCROW_MAX_AMOUNT_USD_MINOR": "7000",
        "ESCROW_MAX_AMOUNT_USDC_MINOR": "9000000",
        "ESCROW_FEE_BPS": "250",
    }
    rules = domain_settings(load_settings(env))
    assert rules.max_amount_for(Currency.USD) == 7_000
    assert rules.max_amount_for(Currency.USDC) == 9_000_000
    assert rules.fee_bps == 250
    with pytest.raises(ConfigError):
        load_settings({"ESCROW_FEE_BPS": "10001"})


def test_a_release_of_nothing_calls_no_provider() -> None:
    run = reach("DELIVERED", milestones=False)
    run.ok("ReleaseFunds", "buyer", {})
    released = run.state
    assert released is not None and released.settlement is not None
    effect = Effect(
        released.settlement.settlement_id,
        released.escrow_id,
        "t.commands",
        EffectKind.SETTLEMENT,
        "STRIPE",
        "stripe",
        1,
        {"escrow": released.model_dump(mode="json", by_alias=True)},
    )
    nothing = released.model_copy(
        update={"settlement": released.settlement.model_copy(update={"payout_amount": 0})}
    )
    assert nothing_to_move(effect, nothing) == {
        "provider": "stripe",
        "providerReference": "no-transfer",
        "amount": "0",
    }
    assert nothing_to_move(effect, released) is None
    assert effect_snapshot(effect) == released
