"""``GET /api/escrow/{id}``'s body read straight from a table value: the same as decoding the
whole snapshot and dropping its bookkeeping, for every state, older snapshots included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from escrow_stream.tables import escrows as escrow_table
from escrow_stream.web.reads import (
    INTERNAL_SNAPSHOT_FIELDS,
    EscrowReader,
    public_snapshot,
    stored_public_snapshot,
)
from tests.unit.domain_support import reach

OTHER = "http://worker-2:6066"


def whole_decode(value: bytes) -> dict[str, Any]:
    """The reference: the whole snapshot decoded, re-encoded, its bookkeeping dropped."""
    escrow = escrow_table.load(value)
    assert escrow is not None
    data = json.loads(escrow_table.dump(escrow))
    return {k: v for k, v in data.items() if k not in INTERNAL_SNAPSHOT_FIELDS}


@pytest.mark.parametrize(
    "status", ["AWAIT_FUNDS", "FUNDS_HELD", "DELIVERED", "RELEASED", "DISPUTED", "REFUNDED"]
)
def test_the_public_snapshot_is_the_whole_decode_without_bookkeeping(status: str) -> None:
    escrow = reach(status).state
    assert escrow is not None and escrow.recent_commands  # there is bookkeeping to leave out
    value = escrow_table.dump(escrow)
    public = stored_public_snapshot(value)
    assert public == whole_decode(value) == public_snapshot(escrow)
    assert public is not None and not INTERNAL_SNAPSHOT_FIELDS & public.keys()
    assert stored_public_snapshot(None) is None


def test_an_older_snapshot_is_still_upgraded() -> None:
    escrow = reach("FUNDS_HELD").state
    assert escrow is not None and escrow.payment is not None
    data = json.loads(escrow_table.dump(escrow))
    data["payment"]["clientSecret"] = "pi_fake_secret_x"
    value = json.dumps(data).encode()
    public = stored_public_snapshot(value)
    assert public == whole_decode(value)
    assert public is not None and "clientSecret" not in json.dumps(public)


class Remote:
    def __init__(self, answers: dict[str, dict[str, Any] | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, url: str, authorization: str) -> dict[str, Any] | None:
        self.asked.append(url)
        return self.answers.get(url)


async def test_the_reader_answers_locally_or_from_the_owner() -> None:
    escrow = reach("FUNDS_HELD").state
    assert escrow is not None
    value = escrow_table.dump(escrow)
    remote = Remote({})
    local = EscrowReader(lambda _: None, {escrow.escrow_id: value}, {}, remote)
    assert await local.public(escrow.escrow_id, "Bearer t") == public_snapshot(escrow)
    assert await local.public("unknown", "Bearer t") is None
    assert remote.asked == []
    url = f"{OTHER}/api/escrow/{escrow.escrow_id}"
    remote = Remote({url: public_snapshot(escrow)})
    routed = EscrowReader(lambda _: OTHER, {}, {}, remote)
    assert await routed.public(escrow.escrow_id, "Bearer t") == public_snapshot(escrow)
    assert remote.asked == [url]
