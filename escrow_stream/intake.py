"""Accepting a command (SPEC §4, Idempotency-Key and Outbox) for the escrow views and the
webhooks alike; nothing here knows HTTP.

Protocol of one command, in order:

1. With an :class:`IdempotencyKey`: ``begin`` it, waiting (at most ``in_flight_wait_s``)
   for a twin request still in flight.  REPLAYED (same request, completed): its stored
   answer; KEY_REUSED (same key, another request) or IN_FLIGHT: refused.  Either way
   nothing else happens.
2. The caller's ``check`` (authorization, KYC, evidence keys): an error refuses the command.
3. One unit of work (``db.unit_of_work``): the command's ``outbox`` row and the key's
   completion with the answer; it commits before the caller answers, so an accepted
   command survives Kafka being down.
4. Wake the relay; the receipt is ACCEPTED with the answer.

An error in step 2 or 3 abandons the key (a retry may begin it again) and propagates.

A keyed HTTP request's commandId (and a new escrow's id) is derived from the user and the
key (:func:`command_id_for`), so a retry after a lapsed reservation is the *same* command,
which the processor applies once (SPEC §3, rule 1).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from escrow_stream.clock import Clock
from escrow_stream.db import deposits
from escrow_stream.db.deposits import Deposit
from escrow_stream.db.unit_of_work import UnitsOfWork
from escrow_stream.domain import Command
from escrow_stream.idempotency import Begin, BeginKind, IdempotencyStore

#: How long a request waits for its in-flight twin (same key) before it is refused.
IN_FLIGHT_WAIT_S = 5.0
#: How often the twin's record is asked again meanwhile.
IN_FLIGHT_POLL_S = 0.05
COMMAND_ID_NAMESPACE = uuid.UUID("3b8f2a34-8a59-4f5e-9d0e-7c2b1f6a9e41")

Check = Callable[[], Awaitable[None]]


def command_id_for(user_id: str, key: str) -> str:
    """The commandId of a keyed request: the same for every retry of it."""
    return str(uuid.uuid5(COMMAND_ID_NAMESPACE, f"{user_id}\n{key}"))


def escrow_id_for(user_id: str, key: str) -> str:
    """The escrowId a keyed CreateEscrow gets: the same for every retry of it."""
    return str(uuid.uuid5(COMMAND_ID_NAMESPACE, f"escrow\n{user_id}\n{key}"))


@dataclass(frozen=True)
class IdempotencyKey:
    """A request's key: ``scope`` is the caller's user id (``webhook:{provider}`` for a
    webhook), ``request_hash`` what makes a retry the same request."""

    scope: str
    key: str
    request_hash: str


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    REPLAYED = "replayed"
    KEY_REUSED = "key_reused"
    IN_FLIGHT = "in_flight"


@dataclass(frozen=True)
class Receipt:
    """What became of a command; ``status`` and ``body`` are the answer (the caller's when
    ACCEPTED, the stored one when REPLAYED, None when refused)."""

    verdict: Verdict
    status: int | None = None
    body: Any = None


_REFUSED = {
    BeginKind.REPLAY: Verdict.REPLAYED,
    BeginKind.MISMATCH: Verdict.KEY_REUSED,
    BeginKind.CONFLICT_IN_FLIGHT: Verdict.IN_FLIGHT,
}


class Intake:
    """Steps 1-4 of the module docstring, on the composition root's adapters."""

    def __init__(
        self,
        units: UnitsOfWork,
        idempotency: IdempotencyStore,
        clock: Clock,
        commands_topic: str,
        internal_secret: str,
        wake: Callable[[], None],
        *,
        in_flight_wait_s: float = IN_FLIGHT_WAIT_S,
    ) -> None:
        self._units = units
        self._idempotency = idempotency
        self._clock = clock
        self._topic = commands_topic
        self._secret = internal_secret
        self._wake = wake
        self._in_flight_wait_s = in_flight_wait_s

    async def accept(
        self,
        command: Command,
        answer: dict[str, Any],
        *,
        status: int = 202,
        key: IdempotencyKey | None = None,
        check: Check | None = None,
    ) -> Receipt:
        """Steps 1-4; ``answer`` (with ``status``) is what a replay of ``key`` returns."""
        if key is not None:
            begun = await self._begin(key)
            if begun.kind is not BeginKind.NEW:
                return Receipt(_REFUSED[begun.kind], begun.status, begun.body)
        try:
            if check is not None:
                await check()
            async with self._units.begin() as unit:
                await unit.enqueue_command(self._topic, command, self._secret)
                if key is not None:
                    await self._idempotency.complete_in(unit, key.scope, key.key, status, answer)
        except BaseException:
            if key is not None:
                await self._idempotency.abandon(key.scope, key.key)
            raise
        self._wake()
        return Receipt(Verdict.ACCEPTED, status, answer)

    async def _begin(self, key: IdempotencyKey) -> Begin:
        """Step 1: a twin still in flight is waited for (bounded), then replayed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._in_flight_wait_s
        while True:
            begun = await self._idempotency.begin(
                key.scope, key.key, key.request_hash, self._clock()
            )
            if begun.kind is not BeginKind.CONFLICT_IN_FLIGHT or loop.time() >= deadline:
                return begun
            await asyncio.sleep(IN_FLIGHT_POLL_S)

    async def record_deposit(self, deposit: Deposit) -> bool:
        """A custodian's confirmed deposit, recorded once per deposit id for risk screening
        (``agents.deposit_screening`` alone may confirm the funds); False when already recorded."""
        async with self._units.begin() as unit:
            return await deposits.record(unit.connection, deposit, self._topic, self._clock())
