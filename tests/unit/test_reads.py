"""Routed reads without servers (``escrow_stream/web/reads.py``): this worker's tables or
the owning worker, and a command's status from the ``command-outcomes`` table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from escrow_stream.domain import Escrow, Rejection, RejectionCode
from escrow_stream.messages import make_command
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables import outcomes
from escrow_stream.web.auth import Principal, Role
from escrow_stream.web.problems import Problem
from escrow_stream.web.reads import EscrowReader, public_snapshot
from tests.unit.domain_support import BUYER_ID, SELLER_ID, reach

NOW = datetime(2026, 1, 1, tzinfo=UTC)
OTHER = "http://worker-2:6066"
AUTH = "Bearer t"


class Remote:
    """The owning worker, as ``signed_fetch`` would reach it: url → answer (None: 404)."""

    def __init__(self, answers: dict[str, dict[str, Any] | None]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    async def __call__(self, url: str, authorization: str) -> dict[str, Any] | None:
        self.asked.append((url, authorization))
        return self.answers.get(url)


def rejection(command_id: str, escrow_id: str) -> dict[str, Any]:
    record = Rejection(
        command_id=command_id,
        type="ReleaseFunds",
        escrow_id=escrow_id,
        code=RejectionCode.INVALID_TRANSITION,
        message="not in FUNDS_HELD",
        rejected_at=NOW,
    )
    return record.model_dump(mode="json", by_alias=True)


def cmd(command_id: str, escrow_id: str, sender: str = BUYER_ID) -> Any:
    actor = {"id": sender, "role": "user"}
    return make_command(actor, "ReleaseFunds", escrow_id, {}, command_id, NOW)


@pytest.fixture
def escrow() -> Escrow:
    state = reach("AWAIT_FUNDS").state
    assert state is not None
    return state


def reader(
    escrows: dict[str, Any],
    recorded: dict[str, Any] | None = None,
    owner: str | None = None,
    remote: Remote | None = None,
) -> EscrowReader:
    return EscrowReader(lambda _: owner, escrows, recorded or {}, remote or Remote({}))


def buyer() -> Principal:
    return Principal(sub=BUYER_ID, role=Role.USER)


async def test_the_local_owner_reads_its_table(escrow: Escrow) -> None:
    remote = Remote({})
    local = reader({escrow.escrow_id: escrow_table.dump(escrow)}, remote=remote)
    assert await local.escrow(escrow.escrow_id, AUTH) == escrow
    assert await local.escrow("unknown", AUTH) is None
    with pytest.raises(Problem) as missing:
        await local.existing("unknown", AUTH)
    assert missing.value.status == 404
    assert remote.asked == []


async def test_another_owner_is_asked_as_the_caller(escrow: Escrow) -> None:
    snapshot = public_snapshot(escrow)
    remote = Remote({f"{OTHER}/api/escrow/{escrow.escrow_id}": snapshot})
    routed = reader({}, owner=OTHER, remote=remote)
    assert (await routed.escrow(escrow.escrow_id, AUTH)).escrow_id == escrow.escrow_id
    assert await routed.escrow("unknown", AUTH) is None
    assert remote.asked[0] == (f"{OTHER}/api/escrow/{escrow.escrow_id}", AUTH)


async def test_a_remote_command_status_is_pending_until_the_owner_knows_it(escrow: Escrow) -> None:
    command = cmd("c-9", escrow.escrow_id)
    routed = reader({}, owner=OTHER)
    status = await routed.status(command, AUTH)
    assert (status.status, status.command_id) == ("PENDING", "c-9")
    with pytest.raises(Problem) as missing:
        await routed.command_status(escrow.escrow_id, "c-9", buyer(), AUTH)
    assert missing.value.status == 404


async def test_an_accepted_command_is_read_from_the_escrow(escrow: Escrow) -> None:
    created = escrow.recent_commands[0].command_id
    local = reader({escrow.escrow_id: escrow_table.dump(escrow)})
    status = local.local_status(escrow.escrow_id, created)
    assert status.status == "ACCEPTED"
    assert status.escrow == public_snapshot(escrow)
    assert "recentCommands" not in (status.escrow or {})


async def test_rejections_and_no_ops_come_from_the_outcomes_table(escrow: Escrow) -> None:
    rejected, noop = cmd("c-1", escrow.escrow_id), cmd("c-2", escrow.escrow_id)
    value = outcomes.record(None, outcomes.record_key(rejected), None, 10)
    value["entries"][0]["rejection"] = rejection("c-1", escrow.escrow_id)
    value = outcomes.record(value, outcomes.record_key(noop), None, 10)
    local = reader({escrow.escrow_id: escrow_table.dump(escrow)}, {escrow.escrow_id: value})
    status = await local.status(rejected, AUTH)
    assert (status.status, status.code, status.message) == (
        "REJECTED",
        "INVALID_TRANSITION",
        "not in FUNDS_HELD",
    )
    assert (await local.status(noop, AUTH)).status == "NO_OP"
    # the same commandId from another sender is not this command
    assert (await local.status(cmd("c-2", escrow.escrow_id, SELLER_ID), AUTH)).status == ("PENDING")
    assert (await local.command_status(escrow.escrow_id, "c-1", buyer(), AUTH)).status == (
        "REJECTED"
    )


async def test_a_refused_create_is_seen_by_its_sender_and_admins_only() -> None:
    command = cmd("c-1", "e-never")
    value = outcomes.record(None, outcomes.record_key(command), None, 10)
    local = reader({}, {"e-never": value})
    mine = await local.command_status("e-never", "c-1", buyer(), AUTH)
    assert mine.status == "NO_OP"
    admin = Principal(sub="admin-1", role=Role.ADMIN)
    assert (await local.command_status("e-never", "c-1", admin, AUTH)).status == "NO_OP"
    stranger = Principal(sub="someone-else", role=Role.USER)
    with pytest.raises(Problem) as hidden:
        await local.command_status("e-never", "c-1", stranger, AUTH)
    assert hidden.value.status == 404


async def test_only_the_parties_and_admins_read_a_command_of_an_escrow(escrow: Escrow) -> None:
    local = reader({escrow.escrow_id: escrow_table.dump(escrow)})
    stranger = Principal(sub="someone-else", role=Role.USER)
    with pytest.raises(Problem) as refused:
        await local.command_status(escrow.escrow_id, "c-1", stranger, AUTH)
    assert refused.value.status == 403


def test_a_sender_id_with_a_bar_is_matched_whole() -> None:
    command = make_command(
        {"id": "auth0|42", "role": "user"}, "ReleaseFunds", "e-1", {}, "c-1", NOW
    )
    value = outcomes.record(None, outcomes.record_key(command), None, 10)
    assert outcomes.find_command(value, "c-1", "auth0|42") is not None
    assert outcomes.find_command(value, "c-1", "42") is None
    assert outcomes.find_command(value, "c-1") is not None
