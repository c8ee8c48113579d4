"""Every status x command type x actor role against the rules written down from SPEC §2."""

from __future__ import annotations

from functools import cache

import pytest
from domain_support import (
    COMMAND_TYPES,
    ROLES,
    SEED_TRANSITIONS,
    Run,
    command,
    days,
    expected_gate,
    payload_for,
    reach,
)

from escrow_stream.domain import DomainSettings, decide

STATUSES: list[tuple[str | None, bool]] = [
    (None, False),
    ("AWAIT_FUNDS", False),
    ("FUNDS_HELD", False),
    ("DELIVERED", False),
    ("DISPUTED", False),
    ("RELEASED", False),
    ("REFUNDED", False),
    ("CANCELLED", False),
    ("FUNDS_HELD", True),
    ("DELIVERED", True),
    ("DISPUTED", True),
]

#: Status after an allowed command (None: unchanged) - from SPEC §2's effect column.
EFFECT: dict[str, str | None] = {
    "CreateEscrow": "AWAIT_FUNDS",
    "RecordPaymentInstructions": None,
    "ConfirmFunds": "FUNDS_HELD",
    "RecordPaymentFailure": None,
    "CancelEscrow": "CANCELLED",
    "MarkDelivered": "DELIVERED",
    "ReleaseFunds": None,  # settlement requested, status unchanged
    "RaiseDispute": "DISPUTED",
    "ResolveDispute": None,
    "RefundEscrow": None,
    "RecordSettlementFailure": None,
    "DeliverMilestone": None,  # m2 of two; m1 already delivered so the escrow is delivered
    "ReleaseMilestone": None,
}


@cache
def _run(status: str | None, pending: bool) -> Run:
    run = Run() if status is None else reach(status, pending)
    run.advance(days(30))  # past every deadline, so timeouts are due
    return run


@pytest.mark.parametrize("timeout_action", ["refund", "release"])
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("command_type", COMMAND_TYPES)
@pytest.mark.parametrize(("status", "pending"), STATUSES)
def test_status_command_role(
    status: str | None, pending: bool, command_type: str, role: str, timeout_action: str
) -> None:
    run = _run(status, pending)
    settings = DomainSettings(delivered_timeout_action=timeout_action)
    payload = payload_for(command_type, role, run.state)
    cmd = command(
        command_type, f"table-{command_type}-{role.replace(' ', '-')}", role, payload, run.now
    )

    decision = decide(run.state, cmd, run.now, settings)

    expected = expected_gate(status, pending, command_type, role, timeout_action)
    if expected is not None:
        assert decision.rejection is not None, f"expected {expected}, got {decision.events}"
        assert decision.rejection.code == expected, decision.rejection.message
        assert decision.events == []
        return
    assert decision.rejection is None, decision.rejection
    assert len(decision.events) == 1
    after = decision.events[0].escrow
    before = run.state.status.value if run.state is not None else None
    target: str | None
    if command_type == "ConfirmSettlement":
        assert run.state is not None and run.state.settlement is not None
        target = "RELEASED" if run.state.settlement.kind == "RELEASE" else "REFUNDED"
    elif command_type == "DeliverMilestone" and status == "FUNDS_HELD":
        target = "DELIVERED"  # the last pending milestone was delivered
    else:
        target = EFFECT[command_type] or before
    assert after.status == target
    if before is not None and before != target:
        assert target in SEED_TRANSITIONS[before]
    if command_type in ("ReleaseFunds", "ResolveDispute", "RefundEscrow", "ReleaseMilestone"):
        assert after.settlement is not None
        assert decision.events[0].type == "SettlementRequested"
