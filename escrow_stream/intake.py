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
   command survives Kafka being down.  Concurrent commands share units
   (:class:`GroupCommit`): each is answered only after the commit that holds its rows.
4. Its after-commit actions (a key completed in Redis), then wake the relay; the receipt is
   ACCEPTED with the answer.

An error in step 2 or 3 abandons the key (a retry may begin it again) and propagates.

A keyed HTTP request's commandId (and a new escrow's id) is derived from the user and the
key (:func:`command_id_for`), so a retry after a lapsed reservation is the *same* command,
which the processor applies once (SPEC §3, rule 1).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg

from escrow_stream.clock import Clock
from escrow_stream.db import deposits
from escrow_stream.db.deposits import Deposit
from escrow_stream.db.unit_of_work import AfterCommit, UnitOfWork, UnitsOfWork
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


#: A request's writes in step 3, on the unit it is given.
Writes = Callable[[UnitOfWork], Awaitable[None]]
#: Commands written in one unit at most.
BATCH_SIZE_MAX = 64
#: Units being written at once at most (each on a pooled connection of its own).
BATCHES_IN_FLIGHT_MAX = 2


class _Member:
    """One request's view of a shared unit: its writes go to the unit, its after-commit
    actions stay its own (run by the request once the unit has committed)."""

    def __init__(self, unit: UnitOfWork) -> None:
        self._unit = unit
        self.actions: list[AfterCommit] = []

    @property
    def connection(self) -> asyncpg.Connection:
        return self._unit.connection

    async def enqueue_command(self, topic: str, command: Command, secret: str) -> None:
        await self._unit.enqueue_command(topic, command, secret)

    def after_commit(self, action: AfterCommit) -> None:
        self.actions.append(action)

    def savepoint(self) -> AbstractAsyncContextManager[object]:
        return self._unit.savepoint()


class GroupCommit:
    """Group commit: the writes of concurrent requests in one unit of work.

    1. A request hands in its writes (:meth:`write`) and waits.
    2. At most ``batches_in_flight_max`` units are written at once; each takes the waiting
       requests (at most ``batch_size_max``, oldest first; one that stopped waiting is
       left out) and runs their writes in turn on it.
    3. The unit commits; only then is each of its requests woken, with its own after-commit
       actions.
    4. A request's own writes run in a savepoint: if they fail, that request alone gets the
       error and the others go on.  An error of the unit itself — the commit (whose outcome
       may then be unknown), the connection — is raised in every request of that batch;
       none of them is answered as accepted.
    """

    def __init__(
        self,
        units: UnitsOfWork,
        *,
        batch_size_max: int = BATCH_SIZE_MAX,
        batches_in_flight_max: int = BATCHES_IN_FLIGHT_MAX,
    ) -> None:
        self._units = units
        self._batch_size_max = batch_size_max
        self._batches_in_flight_max = batches_in_flight_max
        self._waiting: deque[tuple[Writes, asyncio.Future[list[AfterCommit]]]] = deque()
        self._in_flight = 0
        self._writers: set[asyncio.Task[None]] = set()

    async def write(self, writes: Writes) -> list[AfterCommit]:
        """Step 1: returns once ``writes`` committed, with their after-commit actions."""
        done: asyncio.Future[list[AfterCommit]] = asyncio.get_running_loop().create_future()
        self._waiting.append((writes, done))
        if self._in_flight < self._batches_in_flight_max:
            self._in_flight += 1
            task = asyncio.create_task(self._write_batches())
            self._writers.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self._writers.discard)
        return await done

    async def _write_batches(self) -> None:
        """Steps 2-4 until nobody waits."""
        try:
            while self._waiting:
                batch: list[tuple[Writes, asyncio.Future[list[AfterCommit]]]] = []
                while self._waiting and len(batch) < self._batch_size_max:
                    writes, done = self._waiting.popleft()
                    if not done.done():  # a cancelled request is not written
                        batch.append((writes, done))
                if batch:
                    await self._write_batch(batch)
        finally:
            self._in_flight -= 1

    async def _write_batch(
        self, batch: list[tuple[Writes, asyncio.Future[list[AfterCommit]]]]
    ) -> None:
        written: list[tuple[_Member, asyncio.Future[list[AfterCommit]]]] = []
        try:
            async with self._units.begin() as unit:
                for writes, done in batch:
                    member = _Member(unit)
                    try:
                        async with unit.savepoint():  # a request's failure is its own
                            await writes(member)
                    except Exception as exc:
                        if not done.done():
                            done.set_exception(exc)
                        continue
                    written.append((member, done))
        except BaseException as exc:  # step 4 (cancelled, at shutdown: cancel them too)
            # every request of the batch: those written, and those the unit never got to
            # (it failed to begin, or failed on an earlier request's savepoint)
            for _, done in batch:
                if not done.done():
                    if isinstance(exc, Exception):
                        done.set_exception(exc)
                    else:
                        done.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for member, done in written:  # step 3
            if not done.done():
                done.set_result(member.actions)


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
        self._group = GroupCommit(units)

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

            async def writes(unit: UnitOfWork) -> None:
                await unit.enqueue_command(self._topic, command, self._secret)
                if key is not None:
                    await self._idempotency.complete_in(unit, key.scope, key.key, status, answer)

            for action in await self._group.write(writes):
                await action()
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
