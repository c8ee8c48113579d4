"""Builders and an independent model of SPEC §2 shared by the domain unit tests."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from escrow_stream.domain import (
    Command,
    Decision,
    DecisionContext,
    DomainSettings,
    Escrow,
    Event,
    StripeAccountDestination,
    decide,
    evolve,
    parse_command,
)

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
ESCROW_ID = "esc-1"
BUYER_ID = "buyer-1"
SELLER_ID = "seller-1"
AMOUNT = 10_000
SELLER_FEE = 500
SELLER_ACCOUNT = "acct_seller_1"
#: The context of a seller with an ACTIVE Stripe payout account.
SELLER_PAYOUT = DecisionContext(seller_payout=StripeAccountDestination(account_id=SELLER_ACCOUNT))

ROLES = ("buyer", "seller", "other user", "admin", "service", "system")
ACTORS: dict[str, dict[str, str]] = {
    "buyer": {"id": BUYER_ID, "role": "user"},
    "seller": {"id": SELLER_ID, "role": "user"},
    "other user": {"id": "user-9", "role": "user"},
    "admin": {"id": "admin-1", "role": "admin"},
    "service": {"id": "marketplace", "role": "service"},
    "system": {"id": "payments-agent", "role": "system"},
}

COMMAND_TYPES = (
    "CreateEscrow",
    "RecordPaymentInstructions",
    "ConfirmFunds",
    "RecordPaymentFailure",
    "CancelEscrow",
    "MarkDelivered",
    "ReleaseFunds",
    "RaiseDispute",
    "ResolveDispute",
    "RefundEscrow",
    "ConfirmSettlement",
    "RecordSettlementFailure",
    "DeliverMilestone",
    "ReleaseMilestone",
)

# --- the independent model, written from SPEC §2/§6 text (not from the implementation) ---

SEED_TRANSITIONS: dict[str, set[str]] = {
    "AWAIT_FUNDS": {"FUNDS_HELD", "CANCELLED"},
    "FUNDS_HELD": {"DELIVERED", "DISPUTED", "REFUNDED"},
    "DELIVERED": {"RELEASED", "DISPUTED", "REFUNDED"},
    "DISPUTED": {"RELEASED", "REFUNDED"},
    "RELEASED": set(),
    "REFUNDED": set(),
    "CANCELLED": set(),
}

SPEC_SENDERS: dict[str, set[str]] = {
    "CreateEscrow": {"buyer", "service"},
    "RecordPaymentInstructions": {"system"},
    "ConfirmFunds": {"system"},
    "RecordPaymentFailure": {"system"},
    "CancelEscrow": {"buyer", "seller", "admin", "system"},
    "MarkDelivered": {"seller"},
    "ReleaseFunds": {"buyer", "admin", "system"},
    "RaiseDispute": {"buyer", "seller"},
    "ResolveDispute": {"admin"},
    "RefundEscrow": {"admin", "seller", "system"},
    "ConfirmSettlement": {"system"},
    "RecordSettlementFailure": {"system"},
    "DeliverMilestone": {"seller"},
    "ReleaseMilestone": {"buyer", "admin"},
}

SPEC_FROM: dict[str, set[str]] = {
    "RecordPaymentInstructions": {"AWAIT_FUNDS"},
    "ConfirmFunds": {"AWAIT_FUNDS"},
    "RecordPaymentFailure": {"AWAIT_FUNDS"},
    "CancelEscrow": {"AWAIT_FUNDS"},
    "MarkDelivered": {"FUNDS_HELD"},
    "ReleaseFunds": {"DELIVERED"},
    "RaiseDispute": {"FUNDS_HELD", "DELIVERED"},
    "ResolveDispute": {"DISPUTED"},
    "RefundEscrow": {"FUNDS_HELD", "DELIVERED"},
    "DeliverMilestone": {"FUNDS_HELD", "DELIVERED"},
    "ReleaseMilestone": {"FUNDS_HELD", "DELIVERED"},
}
SETTLEMENT_RESULTS = {"ConfirmSettlement", "RecordSettlementFailure"}


def expected_gate(
    status: str | None, pending: bool, command_type: str, role: str, timeout_action: str
) -> str | None:
    """The rejection code SPEC's status/actor rules give, or None when they allow it.

    Precedence: NOT_FOUND/ALREADY_EXISTS, NOT_AUTHORIZED, SETTLEMENT_PENDING (results:
    SETTLEMENT_MISMATCH), INVALID_TRANSITION, FEATURE_DISABLED (the DELIVERED timeout action).
    """
    if status is None:
        if command_type != "CreateEscrow":
            return "NOT_FOUND"
        return None if role in SPEC_SENDERS["CreateEscrow"] else "NOT_AUTHORIZED"
    if command_type == "CreateEscrow":
        return "ALREADY_EXISTS"
    if role not in SPEC_SENDERS[command_type]:
        return "NOT_AUTHORIZED"
    if command_type in SETTLEMENT_RESULTS:  # a result when none is pending names no pending one
        return None if pending else "SETTLEMENT_MISMATCH"
    if pending:
        return "SETTLEMENT_PENDING"
    allowed = SPEC_FROM[command_type]
    if role == "system" and command_type in ("RefundEscrow", "ReleaseFunds"):
        allowed = {"DELIVERED"}  # timeouts act only on DELIVERED escrows
    if status not in allowed:
        return "INVALID_TRANSITION"
    if role == "system" and command_type == "RefundEscrow" and timeout_action != "refund":
        return "FEATURE_DISABLED"
    if role == "system" and command_type == "ReleaseFunds" and timeout_action != "release":
        return "FEATURE_DISABLED"
    return None


# --- builders ---------------------------------------------------------------------------


def envelope(
    command_type: str,
    command_id: str,
    role: str,
    payload: dict[str, Any] | None,
    at: datetime = T0,
    escrow_id: str = ESCROW_ID,
) -> dict[str, Any]:
    """A command as it arrives in JSON."""
    data: dict[str, Any] = {
        "schemaVersion": 1,
        "commandId": command_id,
        "type": command_type,
        "escrowId": escrow_id,
        "actor": ACTORS[role],
        "issuedAt": at.isoformat(),
        "traceId": "trace-1",
        "correlationId": "corr-1",
    }
    if payload is not None:
        data["payload"] = payload
    return data


def create_payload(milestones: bool = True, **overrides: Any) -> dict[str, Any]:
    """A valid CreateEscrow payload (USD on Stripe, two milestones by default)."""
    payload: dict[str, Any] = {
        "offerId": "offer-1",
        "contractId": "contract-1",
        "buyerId": BUYER_ID,
        "sellerId": SELLER_ID,
        "rail": "STRIPE",
        "amount": str(AMOUNT),
        "currency": "USD",
        "sellerFee": str(SELLER_FEE),
        "sellerAccountId": "acct_1",
    }
    if milestones:
        payload["milestones"] = [
            {"milestoneId": "m1", "title": "Design", "amount": "6000"},
            {"milestoneId": "m2", "title": "Build", "amount": "4000"},
        ]
    payload.update(overrides)
    return payload


def payload_for(command_type: str, role: str, state: Escrow | None) -> dict[str, Any] | None:
    """A payload that is valid for this command from this role on `state`."""
    timeout = role == "system"
    settlement = state.settlement if state is not None else None
    payloads: dict[str, dict[str, Any] | None] = {
        "CreateEscrow": create_payload(),
        "RecordPaymentInstructions": {
            "provider": "stripe",
            "providerPaymentId": "pi_1",
        },
        "ConfirmFunds": {
            "provider": "stripe",
            "providerPaymentId": "pi_2",
            "amount": str(AMOUNT),
            "currency": "USD",
        },
        "RecordPaymentFailure": {
            "provider": "stripe",
            "providerPaymentId": "pi_1",
            "errorCode": "card_declined",
            "errorMessage": "Your card was declined.",
        },
        "CancelEscrow": {
            "reason": {
                "buyer": "BUYER_CANCELLED",
                "seller": "SELLER_CANCELLED",
                "admin": "ADMIN",
                "system": "TIMEOUT",
            }.get(role, "BUYER_CANCELLED")
        },
        "MarkDelivered": {"note": "shipped", "evidenceKeys": ["ev/1.png"]},
        "ReleaseFunds": {"reason": "TIMEOUT"} if timeout else None,
        "RaiseDispute": {"reason": "not as described"},
        "ResolveDispute": {"resolution": "RELEASE", "reason": "delivered as agreed"},
        "RefundEscrow": {"reason": "TIMEOUT" if timeout else "cannot deliver"},
        "ConfirmSettlement": {
            "settlementId": settlement.settlement_id if settlement else "escrow-release:x:all:1",
            "provider": "stripe",
            "providerReference": "tr_1",
            "amount": str(settlement.payout_amount if settlement else 1),
        },
        "RecordSettlementFailure": {
            "settlementId": settlement.settlement_id if settlement else "escrow-release:x:all:1",
            "errorCode": "insufficient_funds",
            "errorMessage": "platform balance too low",
            "retryable": True,
        },
        "DeliverMilestone": {"milestoneId": "m2"},
        "ReleaseMilestone": {"milestoneId": "m1"},
    }
    return payloads[command_type]


def command(
    command_type: str,
    command_id: str,
    role: str,
    payload: dict[str, Any] | None = None,
    at: datetime = T0,
) -> Command:
    """Parse a command from its JSON envelope (the wire path)."""
    return parse_command(envelope(command_type, command_id, role, payload, at))


class Run:
    """An escrow driven through commands, keeping its state and every event."""

    def __init__(self, settings: DomainSettings | None = None) -> None:
        self.settings = settings or DomainSettings()
        #: What the processor would look up; by default the seller has an ACTIVE account.
        self.context: DecisionContext | None = SELLER_PAYOUT
        self.state: Escrow | None = None
        self.events: list[Event] = []
        self.now = T0
        self._count = 0

    def send(
        self,
        command_type: str,
        role: str,
        payload: dict[str, Any] | None = None,
        context: DecisionContext | None = None,
        command_id: str | None = None,
    ) -> Decision:
        """Decide a command at the current time and apply its events."""
        self._count += 1
        cid = command_id or f"cmd-{self._count}"
        decision = decide(
            self.state,
            command(command_type, cid, role, payload, self.now),
            self.now,
            self.settings,
            context if context is not None else self.context,
        )
        if decision.events and not decision.duplicate:
            self.events.extend(decision.events)
            self.state = decision.events[-1].escrow
        return decision

    def ok(self, command_type: str, role: str, payload: dict[str, Any] | None = None) -> Decision:
        """Send and require acceptance."""
        decision = self.send(command_type, role, payload)
        assert decision.rejection is None, decision.rejection
        return decision

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward."""
        self.now += delta


def reach(status: str, pending: bool = False, milestones: bool = True) -> Run:
    """A run whose escrow is in `status` (and, when asked, has a settlement pending)."""
    run = Run()
    run.ok("CreateEscrow", "buyer", create_payload(milestones=milestones))
    if status == "CANCELLED":
        run.ok("CancelEscrow", "buyer", {"reason": "BUYER_CANCELLED"})
    if status in ("AWAIT_FUNDS", "CANCELLED"):
        return run
    run.ok(
        "RecordPaymentInstructions", "system", payload_for("RecordPaymentInstructions", "", None)
    )
    funds = payload_for("ConfirmFunds", "system", None)
    assert funds is not None
    run.ok("ConfirmFunds", "system", {**funds, "providerPaymentId": "pi_1"})
    if milestones:
        run.ok("DeliverMilestone", "seller", {"milestoneId": "m1"})
    if status == "REFUNDED":
        run.ok("RefundEscrow", "admin", {"reason": "cannot deliver"})
        run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "system", run.state))
        return run
    if status == "FUNDS_HELD":
        if pending:
            run.ok("RefundEscrow", "admin", {"reason": "cannot deliver"})
        return run
    run.ok("MarkDelivered", "seller", {})
    if status == "RELEASED":
        run.ok("ReleaseFunds", "buyer")
        run.ok("ConfirmSettlement", "system", payload_for("ConfirmSettlement", "system", run.state))
        return run
    if status == "DELIVERED":
        if pending:
            run.ok("ReleaseFunds", "buyer")
        return run
    assert status == "DISPUTED"
    run.ok("RaiseDispute", "buyer", {"reason": "late"})
    if pending:
        run.ok("ResolveDispute", "admin", {"resolution": "REFUND", "reason": "seller at fault"})
    return run


def fold(events: Iterable[Event]) -> Escrow | None:
    """Rebuild the state from events."""
    state: Escrow | None = None
    for event in events:
        state = evolve(state, event)
    return state


def days(n: float) -> timedelta:
    """n days."""
    return timedelta(days=n)
