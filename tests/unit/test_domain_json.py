"""JSON round trips of every command, event and rejection; the exported JSON Schemas."""

from __future__ import annotations

import json
from typing import Any

import pytest
from domain_support import (
    COMMAND_TYPES,
    ROLES,
    Run,
    command,
    create_payload,
    days,
    payload_for,
    reach,
)

from escrow_stream.domain import (
    EVENT_TYPES,
    CreateEscrow,
    DomainSettings,
    Event,
    Rejection,
    json_schemas,
    parse_command,
    parse_event,
)


def _wire(data: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(data))
    return loaded


@pytest.mark.parametrize("command_type", COMMAND_TYPES)
def test_every_command_round_trips(command_type: str) -> None:
    role = "system" if command_type in ("RefundEscrow", "ReleaseFunds") else "admin"
    state = reach("DELIVERED", pending=True).state
    original = command(command_type, "cmd-rt", role, payload_for(command_type, role, state))

    dumped = original.model_dump(mode="json", by_alias=True)

    assert parse_command(_wire(dumped)) == original
    assert dumped["commandId"] == "cmd-rt" and dumped["type"] == command_type


def test_command_amounts_are_strings_on_the_wire_and_ints_in_python() -> None:
    cmd = command("CreateEscrow", "c1", "buyer", create_payload())
    assert isinstance(cmd, CreateEscrow)
    assert cmd.payload.amount == 10_000
    dumped = cmd.model_dump(mode="json", by_alias=True)
    assert dumped["payload"]["amount"] == "10000"
    assert dumped["payload"]["milestones"][0]["amount"] == "6000"
    assert dumped["payload"]["sellerFee"] == "500"


def _all_events() -> list[Event]:
    events: list[Event] = []
    for status, pending in (("RELEASED", False), ("REFUNDED", False), ("CANCELLED", False)):
        events += reach(status, pending).events
    disputed = reach("DISPUTED", pending=True)
    disputed.ok(
        "RecordSettlementFailure",
        "system",
        payload_for("RecordSettlementFailure", "", disputed.state),
    )
    events += disputed.events
    failing = reach("AWAIT_FUNDS")
    failing.ok("RecordPaymentFailure", "system", payload_for("RecordPaymentFailure", "", None))
    events += failing.events
    milestones = reach("FUNDS_HELD")
    milestones.ok("ReleaseMilestone", "buyer", {"milestoneId": "m1"})
    milestones.ok(
        "ConfirmSettlement", "system", payload_for("ConfirmSettlement", "", milestones.state)
    )
    events += milestones.events
    charged_back = reach("RELEASED")
    dispute = {"provider": "stripe", "disputeId": "dp_1", "amount": "10000", "currency": "USD"}
    charged_back.ok("OpenChargeback", "system", {**dispute, "reason": "fraudulent"})
    charged_back.ok("CloseChargeback", "system", {"disputeId": "dp_1", "outcome": "WON"})
    events += charged_back.events
    return events


EVENTS = _all_events()


def test_the_scenarios_cover_every_event_type() -> None:
    assert {e.type for e in EVENTS} == set(EVENT_TYPES)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{e.type}-v{e.version}")
def test_every_event_round_trips(event: Event) -> None:
    dumped = event.model_dump(mode="json", by_alias=True)
    parsed = parse_event(_wire(dumped))
    assert parsed == event
    assert parsed.model_dump(mode="json", by_alias=True) == dumped
    snapshot = dumped["escrow"]
    for key in (
        "escrowId",
        "offerId",
        "contractId",
        "buyerId",
        "sellerId",
        "rail",
        "currency",
        "amount",
        "status",
        "version",
        "createdAt",
        "updatedAt",
        "expiresAt",
        "autoRefundAt",
        "payment",
        "settlement",
        "dispute",
        "milestones",
        "fundedAmount",
        "releasedAmount",
        "refundedAmount",
        "sellerFee",
        "ledger",
        "recentCommands",
    ):
        assert key in snapshot, key
    assert isinstance(snapshot["amount"], str) and isinstance(snapshot["fundedAmount"], str)
    assert dumped["version"] == snapshot["version"]
    assert dumped["causationId"] and dumped["correlationId"] == "corr-1"


def test_rejection_round_trips() -> None:
    run = Run()
    decision = run.send("ReleaseFunds", "buyer")
    assert decision.rejection is not None
    dumped = decision.rejection.model_dump(mode="json", by_alias=True)
    assert set(dumped) >= {"commandId", "type", "escrowId", "code", "message", "rejectedAt"}
    assert dumped["code"] == "NOT_FOUND"
    assert Rejection.model_validate(_wire(dumped)) == decision.rejection


def test_json_schemas_cover_commands_events_rejections_and_the_snapshot() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"command", "event", "rejection", "escrow"}
    text = json.dumps(schemas)
    for name in (*COMMAND_TYPES, *EVENT_TYPES):
        assert name in text
    assert schemas["command"]["discriminator"]["propertyName"] == "type"
    assert "recentCommands" in schemas["escrow"]["properties"]


def test_timestamps_survive_a_round_trip_with_offsets() -> None:
    run = Run(DomainSettings())
    run.advance(days(0.5))
    run.ok("CreateEscrow", "buyer", create_payload())
    event = run.events[0]
    assert parse_event(_wire(event.model_dump(mode="json", by_alias=True))).occurred_at == run.now
    assert ROLES  # the shared roles are importable
