"""SPEC §10 chargebacks at the edges, without servers: the Stripe dispute webhook's mapping,
the payments agent's hold decisions, the holding-limit settings and gauge, the metric."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from escrow_stream.agents.effect_rules import chargeback_open, is_chargeback_refund
from escrow_stream.agents.processor import count_chargebacks
from escrow_stream.agents.timeouts import due_timeouts
from escrow_stream.config import ConfigError, load_settings
from escrow_stream.domain import DomainSettings, RejectionCode
from escrow_stream.domain.timeouts import holds_card_funds_past
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.web.problems import REJECTION_STATUS
from escrow_stream.web.webhooks import dispute_command
from tests.unit.domain_support import AMOUNT, days, reach

DISPUTE = "dp_1"


def stripe_event(kind: str, **dispute: Any) -> dict[str, Any]:
    obj = {
        "id": DISPUTE,
        "object": "dispute",
        "amount": AMOUNT,
        "currency": "usd",
        "charge": "ch_1",
        "payment_intent": "pi_1",
        "reason": "fraudulent",
        "status": "needs_response",
        **dispute,
    }
    return {"id": "evt_1", "type": kind, "data": {"object": obj}}


def test_dispute_created_opens_a_chargeback() -> None:
    assert dispute_command(stripe_event("charge.dispute.created")) == (
        "OpenChargeback",
        {
            "provider": "stripe",
            "disputeId": DISPUTE,
            "chargeId": "ch_1",
            "paymentIntentId": "pi_1",
            "amount": str(AMOUNT),
            "currency": "USD",
            "reason": "fraudulent",
        },
    )


@pytest.mark.parametrize(
    ("status", "outcome"), [("won", "WON"), ("lost", "LOST"), ("warning_closed", "WON")]
)
def test_dispute_closed_maps_its_status(status: str, outcome: str) -> None:
    mapped = dispute_command(stripe_event("charge.dispute.closed", status=status))
    assert mapped == (
        "CloseChargeback",
        {"disputeId": DISPUTE, "outcome": outcome, "amount": str(AMOUNT)},
    )


def test_other_dispute_events_make_no_command() -> None:
    assert dispute_command(stripe_event("charge.dispute.closed", status="under_review")) is None
    assert dispute_command(stripe_event("charge.dispute.created", id=None)) is None


def test_chargeback_open_is_a_409() -> None:
    assert REJECTION_STATUS[RejectionCode.CHARGEBACK_OPEN] == 409


OPEN_CHARGEBACK = {
    "provider": "stripe",
    "disputeId": DISPUTE,
    "amount": "10000",
    "currency": "USD",
    "reason": "fraudulent",
}


def test_the_agent_holds_on_the_newest_snapshot() -> None:
    run = reach("DELIVERED", pending=True, milestones=False)
    requested = run.events[-1]  # SettlementRequested, before the chargeback
    run.ok("OpenChargeback", "system", OPEN_CHARGEBACK)
    opened = run.events[-1]
    assert chargeback_open(requested, None) is False
    assert chargeback_open(opened, None) is True
    # an older event read while the mirror already shows the chargeback: held
    assert chargeback_open(requested, (opened.version, opened.escrow)) is True
    run.ok("CloseChargeback", "system", {"disputeId": DISPUTE, "outcome": "WON"})
    assert chargeback_open(run.events[-1], None) is False


def test_only_a_lost_chargeback_refund_drops_held_effects() -> None:
    lost = reach("FUNDS_HELD", milestones=False)
    lost.ok("OpenChargeback", "system", OPEN_CHARGEBACK)
    lost.ok("CloseChargeback", "system", {"disputeId": DISPUTE, "outcome": "LOST"})
    assert lost.events[-1].type == "EscrowRefunded" and is_chargeback_refund(lost.events[-1])
    assert not is_chargeback_refund(reach("REFUNDED", milestones=False).events[-1])
    released = reach("RELEASED", milestones=False)
    released.ok("OpenChargeback", "system", OPEN_CHARGEBACK)
    released.ok("CloseChargeback", "system", {"disputeId": DISPUTE, "outcome": "LOST"})
    assert released.events[-1].type == "ChargebackClosed"
    assert not is_chargeback_refund(released.events[-1])


def test_hold_limits_are_settings_with_the_warning_first() -> None:
    defaults = load_settings({})
    assert (defaults.stripe_max_hold_days, defaults.stripe_hold_warn_days) == (90, 80)
    custom = load_settings({"STRIPE_MAX_HOLD_DAYS": "30", "STRIPE_HOLD_WARN_DAYS": "20"})
    assert (custom.stripe_max_hold_days, custom.stripe_hold_warn_days) == (30, 20)
    for warn in ("90", "120"):
        with pytest.raises(ConfigError, match="STRIPE_HOLD_WARN_DAYS"):
            load_settings({"STRIPE_HOLD_WARN_DAYS": warn})


def test_the_timeout_scan_counts_card_funds_held_past_the_warning() -> None:
    held = reach("FUNDS_HELD", milestones=False)
    released = reach("RELEASED", milestones=False)
    assert held.state is not None and released.state is not None
    funded_at = held.state.payment.funded_at  # type: ignore[union-attr]
    assert funded_at is not None
    assert not holds_card_funds_past(held.state, funded_at + days(80), 80)
    assert holds_card_funds_past(held.state, funded_at + days(81), 80)
    assert not holds_card_funds_past(released.state, funded_at + days(81), 80)

    values = [escrow_table.dump(held.state), escrow_table.dump(released.state)]
    due_timeouts(values, funded_at + days(81), DomainSettings(), hold_warn_days=80)
    assert REGISTRY.get_sample_value("escrow_stripe_holds_past_warning") == 1
    due_timeouts(values, funded_at + days(1), DomainSettings(), hold_warn_days=80)
    assert REGISTRY.get_sample_value("escrow_stripe_holds_past_warning") == 0


def test_chargebacks_are_counted_by_outcome() -> None:
    def count(outcome: str) -> float:
        return REGISTRY.get_sample_value("escrow_chargebacks_total", {"outcome": outcome}) or 0.0

    before = {o: count(o) for o in ("opened", "won", "lost")}
    run = reach("FUNDS_HELD", milestones=False)
    dispute = {"provider": "stripe", "amount": "10000", "currency": "USD", "reason": "fraud"}
    count_chargebacks(run.ok("OpenChargeback", "system", {**dispute, "disputeId": "dp_a"}).events)
    count_chargebacks(
        run.ok("CloseChargeback", "system", {"disputeId": "dp_a", "outcome": "LOST"}).events
    )
    released = reach("RELEASED", milestones=False)
    count_chargebacks(
        released.ok("OpenChargeback", "system", {**dispute, "disputeId": "dp_b"}).events
    )
    count_chargebacks(
        released.ok("CloseChargeback", "system", {"disputeId": "dp_b", "outcome": "WON"}).events
    )
    assert {o: count(o) - before[o] for o in before} == {"opened": 2, "won": 1, "lost": 1}
