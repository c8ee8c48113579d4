"""The processor's pure parts: timeout scanning, outcome records, schema export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from domain_support import T0, days, reach

from escrow_stream.agents.handling import Outcome, handle_command, read_command
from escrow_stream.agents.timeouts import due_timeouts
from escrow_stream.cli import main
from escrow_stream.domain import DomainSettings, RejectionCode, command_fingerprint, parse_command
from escrow_stream.signing import signature_headers
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables import outcomes
from escrow_stream.tables.outcomes import record_key

RULES = DomainSettings()
SECRET = "unit-test-secret"


def handle(key: bytes | None, value: bytes, headers: Any, *args: Any) -> Outcome:
    """The processor's two steps on one message, with no lookups (``context`` as given)."""
    read = read_command(key, value)
    return read if isinstance(read, Outcome) else handle_command(read, value, headers, *args)


def stored(status: str) -> tuple[bytes, str]:
    run = reach(status, milestones=False)
    assert run.state is not None
    return escrow_table.dump(run.state), run.state.escrow_id


def test_due_timeouts_finds_expired_await_funds_and_delivered_only() -> None:
    awaiting, _ = stored("AWAIT_FUNDS")
    delivered, _ = stored("DELIVERED")
    held, _ = stored("FUNDS_HELD")
    released, _ = stored("RELEASED")
    values = [awaiting, delivered, held, released]
    assert due_timeouts(values, T0 + days(1), RULES) == []
    due = due_timeouts(values, T0 + days(30), RULES)
    assert sorted((c.type, c.payload.reason) for c in due) == [  # type: ignore[union-attr]
        ("CancelEscrow", "TIMEOUT"),
        ("RefundEscrow", "TIMEOUT"),
    ]
    # deterministic ids: a second scan (or another worker) sends the very same commands
    again = due_timeouts(values, T0 + days(31), RULES)
    assert [c.command_id for c in again] == [c.command_id for c in due]


def test_a_timeout_command_is_accepted_only_when_signed() -> None:
    awaiting, _ = stored("AWAIT_FUNDS")
    (command,) = due_timeouts([awaiting], T0 + days(30), RULES)
    state = escrow_table.load(awaiting)
    body = json.dumps(command.model_dump(mode="json", by_alias=True)).encode()
    key = command.escrow_id.encode()
    unsigned = handle(key, body, [], state, None, T0 + days(30), RULES, SECRET)
    assert unsigned.rejection is not None
    assert unsigned.rejection.code is RejectionCode.NOT_AUTHORIZED
    assert not unsigned.record  # a forged system command must not pre-empt the real one
    signed = handle(
        key, body, signature_headers(SECRET, body), state, None, T0 + days(30), RULES, SECRET
    )
    assert [e.type for e in signed.events] == ["EscrowCancelled"]


def test_recorded_outcomes_are_bounded_and_keyed_by_sender() -> None:
    raw = {
        "commandId": "c-1",
        "type": "ReleaseFunds",
        "escrowId": "e-1",
        "actor": {"id": "buyer-1", "role": "user"},
        "payload": {},
        "issuedAt": T0.isoformat(),
    }
    command = parse_command(raw)
    forged = parse_command({**raw, "actor": {"id": "someone-else", "role": "user"}})
    value = outcomes.record(None, record_key(command), None, entries_max=2)
    assert outcomes.find(value, record_key(command)) == (None, None)
    assert outcomes.find(value, record_key(forged)) is None
    for n in range(3):
        value = outcomes.record(value, f"other-{n}", None, entries_max=2)
    assert len(value["entries"]) == 2
    assert outcomes.find(value, record_key(command)) is None  # evicted, oldest first


def test_schema_export_writes_one_schema_per_message_kind(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["schema", "export", str(tmp_path / "schemas")])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "schemas").iterdir())
    assert files == [
        "command.schema.json",
        "escrow.schema.json",
        "event.schema.json",
        "rejection.schema.json",
    ]
    command_schema = json.loads((tmp_path / "schemas" / "command.schema.json").read_text())
    assert "CreateEscrow" in json.dumps(command_schema)


def _raw(command_id: str, note: str, escrow_id: str, actor_id: str) -> bytes:
    return json.dumps(
        {
            "commandId": command_id,
            "type": "MarkDelivered",
            "escrowId": escrow_id,
            "actor": {"id": actor_id, "role": "user"},
            "payload": {"note": note},
            "issuedAt": T0.isoformat(),
        }
    ).encode()


def test_a_command_id_reused_with_another_payload_is_refused_and_not_recorded() -> None:
    run = reach("FUNDS_HELD", milestones=False)
    state = run.state
    assert state is not None
    e, seller, now = state.escrow_id, state.seller_id, T0 + days(1)
    accepted = handle(
        e.encode(), _raw("c-9", "shipped", e, seller), [], state, None, now, RULES, SECRET
    )
    assert [ev.type for ev in accepted.events] == ["EscrowDelivered"]
    after = accepted.state
    # 1. the escrow remembers the accepted command: the same one is a replay, another is not
    again = handle(
        e.encode(), _raw("c-9", "shipped", e, seller), [], after, None, now, RULES, SECRET
    )
    assert again.duplicate and [ev.event_id for ev in again.events] == [
        ev.event_id for ev in accepted.events
    ]
    other = handle(
        e.encode(), _raw("c-9", "changed", e, seller), [], after, None, now, RULES, SECRET
    )
    assert other.rejection is not None and other.rejection.code is RejectionCode.COMMAND_ID_REUSED
    assert not other.record and not other.events
    # 2. a rejected command is remembered in the outcomes table with its fingerprint
    refused = handle(
        e.encode(), _raw("c-10", "again", e, seller), [], after, None, now, RULES, SECRET
    )
    assert refused.rejection is not None and refused.record  # DELIVERED already
    assert refused.command is not None
    value = outcomes.record(
        None,
        record_key(refused.command),
        refused.rejection,
        10,
        command_fingerprint(refused.command),
    )
    same = handle(
        e.encode(), _raw("c-10", "again", e, seller), [], after, value, now, RULES, SECRET
    )
    assert same.duplicate and same.rejection == refused.rejection
    changed = handle(
        e.encode(), _raw("c-10", "other", e, seller), [], after, value, now, RULES, SECRET
    )
    assert changed.rejection is not None
    assert changed.rejection.code is RejectionCode.COMMAND_ID_REUSED and not changed.record
