"""Routed reads (SPEC §4): an escrow and its commands' outcomes, read where they are current.

Faust routes by the escrow's partition of ``escrow-commands``: the worker that owns it holds
the escrow (``escrows`` table) and the outcomes of its commands that made no event
(``command-outcomes``), so a GET right after a successful ``Prefer: wait`` shows the new
state.  Per read, in order:

1. Locate the owner (:func:`partition_owner`); none known yet (starting, rebalancing): 503.
2. This worker: read its tables.  Another: GET the same resource there as the caller,
   signed as worker-to-worker (``web/internal.py``: exempt from the public rate limits, which
   the caller already passed here), within ``ROUTED_READ_TIMEOUT_S``.

Lists and history read the PostgreSQL mirror instead (``db/queries.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
from aiohttp import ClientSession, ClientTimeout
from yarl import URL

from escrow_stream.clock import Clock
from escrow_stream.domain import Command, Escrow
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables import outcomes
from escrow_stream.web.auth import Principal, Role
from escrow_stream.web.gateway import may_read
from escrow_stream.web.internal import internal_headers
from escrow_stream.web.problems import Problem
from escrow_stream.web.schemas import CommandStatus

ROUTED_READ_TIMEOUT_S = 5.0
WAIT_POLL_S = 0.05

#: Fields of the stored snapshot that are bookkeeping, not part of the API's escrow.
INTERNAL_SNAPSHOT_FIELDS = ("recentCommands",)

#: escrowId → the owning worker's base URL, or None when it is this worker (step 1).
Locate = Callable[[str], str | None]
#: (url, Authorization) → the owner's JSON answer, None for 404 (step 2).
Fetch = Callable[[str, str], Awaitable[dict[str, Any] | None]]


_INTERNAL_FIELD_NAMES = {
    name for name, field in Escrow.model_fields.items() if field.alias in INTERNAL_SNAPSHOT_FIELDS
}


def public_snapshot(escrow: Escrow | dict[str, Any]) -> dict[str, Any]:
    """The escrow as the API shows it (JSON-ready, without the bookkeeping fields)."""
    if isinstance(escrow, dict):
        return {k: v for k, v in escrow.items() if k not in INTERNAL_SNAPSHOT_FIELDS}
    return escrow.model_dump(mode="json", by_alias=True, exclude=_INTERNAL_FIELD_NAMES)


def stored_public_snapshot(value: bytes | None) -> dict[str, Any] | None:
    """A value of the ``escrows`` table (the snapshot's JSON, ``tables/escrows.py``) as the
    API shows it; the fields it leaves out are not even validated (the model still upgrades
    an older snapshot's other fields)."""
    if value is None:
        return None
    data = json.loads(value)
    for name in INTERNAL_SNAPSHOT_FIELDS:
        data.pop(name, None)
    return public_snapshot(Escrow.model_validate(data))


def partition_owner(app: faust.App, commands: faust.TopicT) -> Locate:
    """Step 1 on Faust's router: who owns an escrow's partition of ``commands``."""

    own: tuple[str | None, int | None] | None = None  # this worker's (host, port), read once

    def owner(escrow_id: str) -> str | None:
        nonlocal own
        try:
            url = app.router.external_topic_key_store(commands, escrow_id.encode())
        except (KeyError, TypeError):  # no assignment known yet (starting or rebalancing)
            raise Problem(503, "NOT_READY", "partitions are being assigned; retry") from None
        if own is None:
            canonical = app.conf.canonical_url
            own = (canonical.host, canonical.port)
        if (url.host, url.port) == own:
            return None
        return str(url).rstrip("/")

    return owner


def signed_fetch(internal_secret: str, clock: Clock) -> Fetch:
    """Step 2's GET from the owning worker, as the caller and signed worker-to-worker."""

    async def fetch(url: str, authorization: str) -> dict[str, Any] | None:
        timeout = ClientTimeout(total=ROUTED_READ_TIMEOUT_S)
        headers = {"Authorization": authorization} | internal_headers(
            internal_secret, "GET", URL(url).raw_path_qs, clock().timestamp()
        )
        async with (
            ClientSession(timeout=timeout) as session,
            session.get(url, headers=headers) as response,
        ):
            if response.status == 404:
                return None
            body = await response.json(content_type=None)
            if response.status != 200:
                raise Problem(response.status, body.get("code", "UPSTREAM"), body.get("detail", ""))
            return dict(body)

    return fetch


class EscrowReader:
    """Reads an escrow and its commands' outcomes from the worker that owns it."""

    def __init__(
        self,
        locate: Locate,
        escrows: Mapping[str, Any],
        recorded_outcomes: Mapping[str, Any],
        fetch: Fetch,
    ) -> None:
        self._locate = locate
        self._escrows = escrows
        self._outcomes = recorded_outcomes
        self._fetch = fetch

    async def escrow(self, escrow_id: str, authorization: str) -> Escrow | None:
        owner = self._locate(escrow_id)
        if owner is None:
            return escrow_table.load(self._escrows.get(escrow_id))
        body = await self._fetch(f"{owner}/api/escrow/{escrow_id}", authorization)
        return None if body is None else Escrow.model_validate(body)

    async def public(self, escrow_id: str, authorization: str) -> dict[str, Any] | None:
        """The escrow as the API shows it (:func:`public_snapshot`), or None."""
        owner = self._locate(escrow_id)
        if owner is None:
            return stored_public_snapshot(self._escrows.get(escrow_id))
        return await self._fetch(f"{owner}/api/escrow/{escrow_id}", authorization)

    async def existing(self, escrow_id: str, authorization: str) -> Escrow:
        """The escrow, or 404."""
        escrow = await self.escrow(escrow_id, authorization)
        if escrow is None:
            raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
        return escrow

    async def command_status(
        self, escrow_id: str, command_id: str, principal: Principal, authorization: str
    ) -> CommandStatus:
        """``GET …/commands/{id}``: read on the owner, authorized like the escrow; a command
        whose escrow does not exist (a refused create) is its sender's and admins' only."""
        owner = self._locate(escrow_id)
        if owner is not None:
            url = f"{owner}/api/escrow/{escrow_id}/commands/{command_id}"
            body = await self._fetch(url, authorization)
            if body is None:
                raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
            return CommandStatus.model_validate(body)
        escrow = escrow_table.load(self._escrows.get(escrow_id))
        if escrow is not None:
            if not may_read(principal, escrow):
                raise Problem(403, "NOT_AUTHORIZED", "only the parties and admins see an escrow")
            return self.local_status(escrow_id, command_id)
        sender = None if principal.role is Role.ADMIN else principal.sub
        status = self.local_status(escrow_id, command_id, sender_id=sender)
        if status.status == "PENDING":
            raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
        return status

    async def status(self, command: Command, authorization: str) -> CommandStatus:
        """What became of a command this caller sent (PENDING while unknown)."""
        escrow_id, command_id = command.escrow_id, command.command_id
        owner = self._locate(escrow_id)
        if owner is not None:
            url = f"{owner}/api/escrow/{escrow_id}/commands/{command_id}"
            body = await self._fetch(url, authorization)
            return CommandStatus.model_validate(
                body or {"escrowId": escrow_id, "commandId": command_id, "status": "PENDING"}
            )
        return self.local_status(escrow_id, command_id, outcomes.record_key(command))

    def local_status(
        self,
        escrow_id: str,
        command_id: str,
        record_key: str | None = None,
        sender_id: str | None = None,
    ) -> CommandStatus:
        """The outcome of a command of an escrow this worker owns: accepted (the escrow
        remembers it), else recorded in ``command-outcomes`` under ``record_key`` (or any
        key of the commandId; with ``sender_id``, only one that user sent), else PENDING."""
        escrow = escrow_table.load(self._escrows.get(escrow_id))
        if escrow is not None and any(r.command_id == command_id for r in escrow.recent_commands):
            return CommandStatus(
                escrow_id=escrow_id,
                command_id=command_id,
                status="ACCEPTED",
                escrow=public_snapshot(escrow),
            )
        recorded = self._outcomes.get(escrow_id)
        found = (
            outcomes.find(recorded, record_key)
            if record_key is not None
            else outcomes.find_command(recorded, command_id, sender_id)
        )
        if found is None:
            return CommandStatus(escrow_id=escrow_id, command_id=command_id, status="PENDING")
        if found.outcome is None:
            return CommandStatus(escrow_id=escrow_id, command_id=command_id, status="NO_OP")
        return CommandStatus(
            escrow_id=escrow_id,
            command_id=command_id,
            status="REJECTED",
            code=found.outcome.code.value,
            message=found.outcome.message,
        )

    async def wait(self, command: Command, wait_s: float, authorization: str) -> CommandStatus:
        """Poll the command's outcome until it is known or ``wait_s`` runs out (a 503 while
        partitions are assigned counts as PENDING)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        pending = CommandStatus(
            escrow_id=command.escrow_id, command_id=command.command_id, status="PENDING"
        )
        while True:
            try:
                status = await self.status(command, authorization)
            except Problem as problem:
                if problem.status != 503:  # partitions being assigned: keep waiting
                    raise
                status = pending
            if status.status != "PENDING" or loop.time() >= deadline:
                return status
            await asyncio.sleep(WAIT_POLL_S)
