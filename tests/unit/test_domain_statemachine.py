"""Hypothesis state machine: random command sequences keep every escrow invariant."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from domain_support import (
    ACTORS,
    COMMAND_TYPES,
    ESCROW_ID,
    ROLES,
    SEED_TRANSITIONS,
    T0,
    envelope,
    expected_gate,
    fold,
)
from hypothesis import HealthCheck, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from escrow_stream.domain import (
    Command,
    Decision,
    DecisionContext,
    DomainSettings,
    Escrow,
    Event,
    StripeAccountDestination,
    WalletDestination,
    check_invariants,
    decide,
    event_id_for,
    parse_command,
    parse_event,
    timeout_command_for,
)

settings.register_profile(
    "domain-default",
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "domain-long",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = "domain-long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "domain-default"

#: Codes a command may still get after SPEC's status/actor gates let it through.
LATER_CODES = {
    "FEATURE_DISABLED",
    "DEADLINE_NOT_REACHED",
    "KYC_REQUIRED",
    "VALIDATION_FAILED",
    "AMOUNT_MISMATCH",
    "INVALID_TRANSITION",  # milestone-level
}

#: Plausible (command, role) pairs per status, to drive escrows deep into their life.
PROGRESS: dict[str | None, list[tuple[str, str]]] = {
    None: [("CreateEscrow", "buyer"), ("CreateEscrow", "service")],
    "AWAIT_FUNDS": [
        ("RecordPaymentInstructions", "system"),
        ("ConfirmFunds", "system"),
        ("ConfirmFunds", "system"),
        ("ConfirmFunds", "system"),
        ("ConfirmFunds", "system"),
        ("RecordPaymentFailure", "system"),
        ("CancelEscrow", "system"),
    ],
    "FUNDS_HELD": [
        ("MarkDelivered", "seller"),
        ("DeliverMilestone", "seller"),
        ("DeliverMilestone", "seller"),
        ("ReleaseMilestone", "buyer"),
        ("ReleaseMilestone", "buyer"),
        ("RaiseDispute", "buyer"),
        ("RefundEscrow", "seller"),
        ("ConfirmFunds", "system"),
    ],
    "DELIVERED": [
        ("ReleaseFunds", "buyer"),
        ("ReleaseFunds", "admin"),
        ("DeliverMilestone", "seller"),
        ("ReleaseMilestone", "admin"),
        ("ReleaseMilestone", "buyer"),
        ("ReleaseMilestone", "buyer"),
        ("RaiseDispute", "seller"),
        ("RefundEscrow", "admin"),
    ],
    "DISPUTED": [("ResolveDispute", "admin")],
}
SETTLEMENT_PROGRESS = [
    ("ConfirmSettlement", "system"),
    ("ConfirmSettlement", "system"),
    ("RecordSettlementFailure", "system"),
]


class EscrowMachine(RuleBasedStateMachine):
    """One escrow per run, driven by valid, invalid, duplicate and timeout commands."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = DomainSettings()
        self.context = DecisionContext()
        self.create: dict[str, Any] = {}
        self.state: Escrow | None = None
        self.events: list[Event] = []
        self.statuses: list[str] = []
        self.now = T0
        self.count = 0
        self.sent: list[Command] = []
        self.accepted: dict[str, list[str]] = {}  # commandId -> eventIds, in order
        self.accepted_order: list[str] = []
        self.replays = 0

    # --- setup --------------------------------------------------------------------------

    @initialize(
        parts=st.integers(min_value=0, max_value=3),
        amount=st.integers(min_value=3, max_value=10**9),
        fee_per_mille=st.integers(min_value=0, max_value=999),
        usdc=st.booleans(),
        action=st.sampled_from(["refund", "release"]),
        auto=st.booleans(),
        milestones_on=st.sampled_from([True, True, True, True, True, False]),
        kyc=st.sampled_from([False, False, True]),
        kyc_both=st.sampled_from([True, True, True, False]),
        recent_max=st.sampled_from([2, 5, 1000]),
    )
    def setup(
        self,
        parts: int,
        amount: int,
        fee_per_mille: int,
        usdc: bool,
        action: str,
        auto: bool,
        milestones_on: bool,
        kyc: bool,
        kyc_both: bool,
        recent_max: int,
    ) -> None:
        self.settings = DomainSettings(
            delivered_timeout_action=action,
            feature_auto_refund=auto,
            feature_milestone_escrows=milestones_on or parts == 0,
            feature_kyc_gating=kyc,
            recent_commands_max=recent_max,
        )
        verified = {"buyer-1", "seller-1"} if kyc_both else {"buyer-1"}
        # the seller has an ACTIVE payout account: releases are performed (SPEC §2's flow;
        # releases awaiting an account have tests of their own in test_domain_payouts.py)
        payout = (
            WalletDestination(address="0x" + "5e" * 20)
            if usdc
            else StripeAccountDestination(account_id="acct_seller_1")
        )
        self.context = DecisionContext(
            kyc_verified_user_ids=frozenset(verified), seller_payout=payout
        )
        milestones = []
        if parts:
            share = amount // parts
            amounts = [share] * (parts - 1) + [amount - share * (parts - 1)]
            milestones = [
                {"milestoneId": f"m{i + 1}", "title": f"part {i + 1}", "amount": str(a)}
                for i, a in enumerate(amounts)
            ]
        self.create = {
            "offerId": "offer-1",
            "contractId": "contract-1",
            "buyerId": "buyer-1",
            "sellerId": "seller-1",
            "rail": "USDC_BASE" if usdc else "STRIPE",
            "amount": str(amount),
            "currency": "USDC" if usdc else "USD",
            "sellerFee": str(amount * fee_per_mille // 1000),
            "milestones": milestones,
        }
        self._send("CreateEscrow", "buyer", 0)

    # --- payloads -----------------------------------------------------------------------

    def _provider(self) -> str:
        return "custodian" if self.create["rail"] == "USDC_BASE" else "stripe"

    def _payload(self, command_type: str, role: str, variant: int) -> dict[str, Any] | None:
        """A valid payload for variant 0; variants 1.. break one rule each."""
        amount = self.create["amount"]
        currency = self.create["currency"]
        provider = (
            self._provider()
            if variant != 1
            else "stripe"
            if self._provider() != "stripe"
            else "custodian"
        )
        settlement = self.state.settlement if self.state is not None else None
        milestone_ids = [m.milestone_id for m in self.state.milestones] if self.state else []
        if command_type == "CreateEscrow":
            return self.create
        if command_type == "RecordPaymentInstructions":
            return {"provider": provider, "providerPaymentId": "pay-1", "depositAddress": "0xabc"}
        if command_type == "ConfirmFunds":
            return {
                "provider": provider,
                "providerPaymentId": "pay-2" if variant == 3 else "pay-1",
                "amount": str(int(amount) + 1) if variant == 2 else amount,
                "currency": currency,
                "senderAddress": "0xdef",
            }
        if command_type == "RecordPaymentFailure":
            return {
                "provider": provider,
                "providerPaymentId": "pay-1",
                "errorCode": "declined",
                "errorMessage": "declined",
            }
        if command_type == "CancelEscrow":
            reasons = {"buyer": "BUYER_CANCELLED", "seller": "SELLER_CANCELLED", "admin": "ADMIN"}
            reason = reasons.get(role, "TIMEOUT")
            if role == "system" and variant == 2:
                reason = "COMPLIANCE_REJECTED"
            if variant == 3:
                reason = "TIMEOUT" if role != "system" else "ADMIN"
            return {"reason": reason}
        if command_type == "MarkDelivered":
            return {"note": "done"}
        if command_type == "ReleaseFunds":
            timeout = (role == "system") != (variant == 3)
            return {"reason": "TIMEOUT"} if timeout else None
        if command_type == "RaiseDispute":
            return {"reason": "broken"}
        if command_type == "ResolveDispute":
            return {"resolution": "REFUND" if variant == 2 else "RELEASE", "reason": "decided"}
        if command_type == "RefundEscrow":
            timeout = (role == "system") != (variant == 3)
            return {"reason": "TIMEOUT" if timeout else "refund please"}
        # variant 3: a result for a settlement that is not the pending one
        settlement_id = (
            settlement.settlement_id
            if settlement is not None and variant != 3
            else f"escrow-refund:{ESCROW_ID}:all:99"
        )
        if command_type == "ConfirmSettlement":
            expected = settlement.payout_amount if settlement is not None else 0
            return {
                "settlementId": settlement_id,
                "provider": provider,
                "providerReference": f"ref-{self.count}",
                "amount": str(expected + 1 if variant == 2 else expected),
            }
        if command_type == "RecordSettlementFailure":
            return {
                "settlementId": settlement_id,
                "errorCode": "failed",
                "errorMessage": "try later",
                "retryable": True,
            }
        assert command_type in ("DeliverMilestone", "ReleaseMilestone")
        if variant == 2 or not milestone_ids:
            return {"milestoneId": "nope"}
        wanted = "PENDING" if command_type == "DeliverMilestone" else "DELIVERED"
        assert self.state is not None
        ready = [m.milestone_id for m in self.state.milestones if m.status == wanted]
        if variant != 3 and ready:
            milestone_ids = ready
        return {"milestoneId": milestone_ids[self.count % len(milestone_ids)]}

    # --- sending ------------------------------------------------------------------------

    def _send(self, command_type: str, role: str, variant: int) -> Decision:
        self.count += 1
        payload = self._payload(command_type, role, variant)
        cmd = parse_command(
            envelope(command_type, f"cmd-{self.count}", role, payload, self.now, ESCROW_ID)
        )
        before = self.state
        decision = self._decide(cmd)
        if variant in (0, 4):  # payload valid: SPEC's gates must decide as written
            self._check_gates(before, cmd, role, decision)
        return decision

    def _decide(self, cmd: Command) -> Decision:
        before = self.state
        remembered = set(self.accepted_order[-self.settings.recent_commands_max :])
        decision = decide(self.state, cmd, self.now, self.settings, self.context)
        assert (decision.rejection is None) or not decision.events
        if cmd.command_id in remembered and before is not None:
            assert decision.duplicate, "a remembered command must be replayed"
            self.replays += 1
            assert [e.event_id for e in decision.events] == self.accepted[cmd.command_id]
            return decision
        assert not decision.duplicate
        self.sent.append(cmd)
        if decision.events:
            self._apply(cmd, decision.events)
        return decision

    def _apply(self, cmd: Command, events: list[Event]) -> None:
        for event in events:
            assert parse_event(event.model_dump(mode="json", by_alias=True)) == event
            status = event.escrow.status.value
            previous = self.statuses[-1] if self.statuses else None
            if previous is not None and previous != status:
                assert status in SEED_TRANSITIONS[previous], f"{previous} -> {status}"
            self.statuses.append(status)
        self.events.extend(events)
        self.state = events[-1].escrow
        self.accepted[cmd.command_id] = [e.event_id for e in events]
        self.accepted_order.append(cmd.command_id)

    def _check_gates(
        self, before: Escrow | None, cmd: Command, role: str, decision: Decision
    ) -> None:
        if decision.duplicate:
            return
        if cmd.type == "ConfirmFunds" and decision.rejection is None and not decision.events:
            return  # repeated provider payment: an accepted no-op
        status = before.status.value if before is not None else None
        pending = before is not None and before.settlement is not None
        expected = expected_gate(
            status, pending, cmd.type, role, self.settings.delivered_timeout_action
        )
        if expected is not None:
            assert decision.rejection is not None, f"{cmd.type}/{role} in {status}: {expected}"
            assert decision.rejection.code == expected, decision.rejection.message
        elif decision.rejection is not None:
            assert decision.rejection.code in LATER_CODES, decision.rejection

    # --- rules --------------------------------------------------------------------------

    @rule(
        command_type=st.sampled_from(COMMAND_TYPES),
        role=st.sampled_from(ROLES),
        variant=st.integers(min_value=0, max_value=4),
    )
    def random_command(self, command_type: str, role: str, variant: int) -> None:
        self._send(command_type, role, variant)

    @rule(
        picks=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=3),
        variant=st.sampled_from([0, 0, 0, 4, 2]),
    )
    def progress(self, picks: list[int], variant: int) -> None:
        for pick in picks:
            if self.state is not None and self.state.settlement is not None:
                choices = SETTLEMENT_PROGRESS
            else:
                choices = PROGRESS.get(self.state.status.value if self.state else None, [])
            if choices:
                command_type, role = choices[pick % len(choices)]
                self._send(command_type, role, variant)

    @rule(
        picks=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=3),
        variant=st.sampled_from([0, 0, 0, 4, 2]),
    )
    def progress_again(self, picks: list[int], variant: int) -> None:
        self.progress(picks, variant)

    @precondition(lambda self: bool(self.sent))
    @rule(pick=st.integers(min_value=0, max_value=10**6))
    def duplicate(self, pick: int) -> None:
        recent = self.sent[-10:]
        cmd = recent[pick % len(recent)]
        before = self.state
        decision = self._decide(cmd)
        if decision.duplicate:
            assert self.state == before

    @rule(hours=st.integers(min_value=0, max_value=24 * 9))
    def advance_time(self, hours: int) -> None:
        self.now += timedelta(hours=hours)

    @precondition(lambda self: self.state is not None)
    @rule()
    def timeout(self) -> None:
        assert self.state is not None
        cmd = timeout_command_for(self.state, self.now, self.settings)
        if cmd is None:
            return
        assert (cmd.actor.id, cmd.actor.role) == ("timeout-processor", "system")
        assert cmd.command_id == f"timeout:{ESCROW_ID}:{self.state.status}:{self.state.version}"
        decision = self._decide(cmd)
        if decision.rejection is not None:
            assert decision.rejection.code == "KYC_REQUIRED", decision.rejection

    def teardown(self) -> None:
        final = self.state.status.value if self.state is not None else "none"
        milestones = "milestones" if self.create.get("milestones") else "single"
        note_event(f"final status: {final} ({milestones})")
        kinds = {e.type for e in self.events}
        for kind in ("SettlementFailed", "MilestoneReleased", "EscrowRefunded", "EscrowReleased"):
            if kind in kinds:
                note_event(f"saw {kind}")
        if self.replays:
            note_event("duplicate replayed")

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def money_and_ledger_hold(self) -> None:
        if self.state is not None:
            assert check_invariants(self.state) == []
            assert (
                self.state.released_amount + self.state.refunded_amount <= self.state.funded_amount
            )

    @invariant()
    def folding_the_events_rebuilds_the_state(self) -> None:
        assert fold(self.events) == self.state

    @invariant()
    def event_ids_are_unique_and_deterministic(self) -> None:
        ids = [e.event_id for e in self.events]
        assert len(set(ids)) == len(ids)
        for index, event in enumerate(self.events, start=1):
            assert event.version == index
            assert event.event_id == event_id_for(ESCROW_ID, index)
            assert event.escrow.version == index


TestEscrowMachine = EscrowMachine.TestCase
TestEscrowMachine.settings = settings.get_profile(PROFILE)
assert set(ACTORS) == set(ROLES)
