"""The command processor: ``escrow-commands`` in, events / rejections / dead letters out.

Per message, in order (SPEC §3, processing guarantee):

1. Read the escrow's state from the ``escrows`` table (this worker owns the partition).
2. Decide with :func:`escrow_stream.agents.handling.handle` (pure).
3. Write the new state to the table *before* sending events (a rejection or no-op is
   written to the ``command-outcomes`` table before the rejection is sent).  A crash after this step
   redelivers the command (its offset is not committed yet); the escrow then recognises the
   commandId and re-emits the recorded events with the same eventIds (rule 1).  A duplicate
   rewrites the state too, so the changelog always carries the state whose events went out.
4. Send the events (key = escrowId) to ``escrow.events.v1``, a rejection to
   ``escrow.rejections.v1``, a poison message to ``escrow-commands.dlq`` with the reason in
   headers.
5. Faust commits the source offset only after the producer is flushed, so nothing is lost;
   a redelivery yields the same eventIds, which every consumer dedupes (rule 2).

One agent instance handles its partitions sequentially (concurrency 1): per-escrow order is
the partition's order and parallelism comes from partitions (rule 4).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import faust
from faust.types import EventT, TableT

from escrow_stream.agents import handling
from escrow_stream.clock import Clock
from escrow_stream.config import Settings, domain_settings
from escrow_stream.domain import (
    Command,
    DecisionContext,
    Escrow,
    Event,
    PayoutDestination,
    Rail,
    Rejection,
    RejectionCode,
    command_fingerprint,
)
from escrow_stream.domain.event_data import (
    ChargebackClosedData,
    ChargebackOpenedData,
    EscrowRefundedData,
)
from escrow_stream.domain.payloads import CHARGEBACK_REASON
from escrow_stream.liveness import ProgressMonitor
from escrow_stream.logs import correlation_id_var, trace_id_var
from escrow_stream.messages import Topics, encode_event, event_headers
from escrow_stream.metrics import (
    CHARGEBACKS,
    COMMAND_OUTCOMES,
    COMMAND_SECONDS,
    DEAD_LETTERS,
    SETTLEMENT_MISMATCHES,
)
from escrow_stream.retry import until_answered
from escrow_stream.tables import deadlines
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables import outcomes as outcome_table
from escrow_stream.transport import CommitGate, Redeliveries

log = logging.getLogger(__name__)

#: Faust's producer refuses requests above this; a larger poison message is truncated in the
#: DLQ (its source topic, partition and offset are in the headers to find the original).
DLQ_VALUE_BYTES_MAX = 900_000

KycLookup = Callable[[frozenset[str]], Awaitable[frozenset[str]]]
#: The ACTIVE payout destination of (user, rail), or None.
PayoutLookup = Callable[[str, Rail], Awaitable[PayoutDestination | None]]

#: A lookup the decision needs (KYC, payout account) that fails is retried, waiting this
#: long first and doubling up to the cap, until it answers or the worker stops.
LOOKUP_RETRY_FIRST_S = 0.1
LOOKUP_RETRY_CAP_S = 5.0

T = TypeVar("T")


def register(app: faust.App, processor: CommandProcessor, progress: ProgressMonitor) -> None:
    """Register the command-processor agent on ``app``; it reports to ``progress``."""

    @app.agent(processor.commands_topic, name="escrow-command-processor")
    async def process_commands(stream: faust.StreamT[bytes]) -> None:
        gate: CommitGate = app.commit_gate  # type: ignore[attr-defined]
        redeliveries = Redeliveries()
        async for event in stream.events():
            message = event.message
            async with gate.held():  # exactly_once: no commit in the middle of a command
                if app.in_transaction and redeliveries.seen(
                    message.tp, message.offset, message.generation_id
                ):
                    event.ack()
                    continue
                await processor.process(event)
                event.ack()  # so the next commit covers it (faust would ack it later)
                if app.in_transaction:  # at_least_once never asks
                    redeliveries.handled(message.tp, message.offset, message.generation_id)
            progress.processed(message.partition, message.offset)


class CommandProcessor:
    """Steps 1-4 of the module docstring, one message at a time (step 5 is Faust's)."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        clock: Clock,
        topics: Topics,
        escrows: TableT[str, Any],
        recorded_outcomes: TableT[str, Any],
        kyc_lookup: KycLookup | None,
        payout_lookup: PayoutLookup | None,
    ) -> None:
        self._app = app
        self._clock = clock
        self._topics = topics
        self._escrows = escrows
        self._recorded_outcomes = recorded_outcomes
        self._kyc_lookup = kyc_lookup
        self._payout_lookup = payout_lookup
        self._rules = domain_settings(settings)
        self._secret = settings.internal_command_secret.get_secret_value()

    @property
    def commands_topic(self) -> faust.TopicT:
        """Where the commands come from (``escrow-commands``)."""
        return self._topics.commands

    async def process(self, event: EventT[bytes]) -> None:
        """Steps 1-4 for one message from ``escrow-commands``."""
        message = event.message
        trace_id_var.set(None)
        correlation_id_var.set(None)
        key: bytes | None = message.key
        value: bytes = message.value or b""
        headers = _header_items(message.headers)
        with COMMAND_SECONDS.time():
            outcome = await self._outcome(key, value, headers)
        _observe(outcome)
        if outcome.dead_letter is not None:
            await self._dead_letter(message, key, value, headers, outcome.dead_letter)
            return
        assert outcome.command is not None
        if outcome.record:  # written before the rejection is sent (step 3)
            self._record(outcome.command, outcome.rejection)
        if outcome.rejection is not None:
            await self._reject(outcome.command, outcome.rejection)
            return
        await self._apply(outcome)

    async def _outcome(
        self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> handling.Outcome:
        """Steps 1-2: the message parsed once, its escrow's state and recorded outcomes, the
        facts the decision needs, and the decision."""
        command = handling.read_command(key, value)
        if isinstance(command, handling.Outcome):
            return command
        escrow_id = command.escrow_id
        state = escrow_table.load(self._escrows.get(escrow_id))
        recorded = self._recorded_outcomes.get(escrow_id)
        context = await self._context_for(command, state)
        return handling.handle_command(
            command,
            value,
            headers,
            state,
            recorded,
            self._clock(),
            self._rules,
            self._secret,
            context,
        )

    async def _looked_up(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A fact the decision needs: PostgreSQL being down delays this partition."""
        return await until_answered(
            what,
            call,
            lambda: bool(self._app.should_stop),
            first_s=LOOKUP_RETRY_FIRST_S,
            cap_s=LOOKUP_RETRY_CAP_S,
        )

    async def _context_for(self, command: Command, state: Escrow | None) -> DecisionContext | None:
        """The facts deciding this command needs (KYC, the seller's payout account)."""
        parties, releases = handling.facts_needed(command, state)
        verified: frozenset[str] = frozenset()
        payout: PayoutDestination | None = None
        kyc_lookup, payout_lookup = self._kyc_lookup, self._payout_lookup
        if parties and self._rules.feature_kyc_gating and kyc_lookup is not None:
            verified = await self._looked_up("KYC lookup", lambda: kyc_lookup(parties))
        if releases and state is not None and payout_lookup is not None:
            seller, rail = state.seller_id, state.rail
            payout = await self._looked_up(
                "payout account lookup", lambda: payout_lookup(seller, rail)
            )
        if not verified and payout is None:
            return None
        return DecisionContext(kyc_verified_user_ids=verified, seller_payout=payout)

    async def _dead_letter(
        self,
        message: Any,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        dead: handling.DeadLetter,
    ) -> None:
        """Step 4: a poison message to ``escrow-commands.dlq``, the reason in headers."""
        DEAD_LETTERS.labels(dead.reason.value).inc()
        log.warning(
            "dead-lettered message %s[%s]@%s: %s",
            message.topic,
            message.partition,
            message.offset,
            dead.reason,
        )
        await self._topics.dlq.send(
            key=key,
            value=value[:DLQ_VALUE_BYTES_MAX],
            headers=headers + _dlq_headers(message, dead, len(value)),
        )

    def _record(self, command: Command, rejection: Rejection | None) -> None:
        """Step 3: a rejection or no-op into the ``command-outcomes`` table."""
        self._recorded_outcomes[command.escrow_id] = outcome_table.record(
            self._recorded_outcomes.get(command.escrow_id),
            outcome_table.record_key(command),
            rejection,
            self._rules.recent_commands_max,
            command_fingerprint(command),
        )

    async def _reject(self, command: Command, rejection: Rejection) -> None:
        """Step 4: the rejection to ``escrow.rejections.v1``."""
        if rejection.code == RejectionCode.SETTLEMENT_MISMATCH:
            SETTLEMENT_MISMATCHES.labels(command.type).inc()
            log.warning("settlement result refused: %s", rejection.message)
        body = rejection.model_dump(mode="json", by_alias=True)
        await self._topics.rejections.send(
            key=command.escrow_id.encode(),
            value=json.dumps(body, separators=(",", ":")).encode(),
            headers=[("x-rejection-code", str(rejection.code).encode())],
        )

    async def _apply(self, outcome: handling.Outcome) -> None:
        """Steps 3-4: the new state into the table, then its events to ``escrow.events.v1``."""
        assert outcome.command is not None
        escrow_id = outcome.command.escrow_id
        if outcome.state is not None and outcome.events:
            self._escrows[escrow_id] = escrow_table.dump(outcome.state)
            deadlines.written(self._escrows, outcome.state)  # the timeouts' index, step 1
        for domain_event in outcome.events:
            await self._topics.events.send(
                key=escrow_id.encode(),
                value=encode_event(domain_event),
                headers=event_headers(domain_event),
            )
        if not outcome.duplicate:
            count_chargebacks(outcome.events)


def _header_items(raw: Any) -> list[tuple[str, bytes]]:
    """A message's headers (a mapping or pairs) as (name, bytes) pairs."""
    raw_headers = raw or []
    pairs = raw_headers.items() if isinstance(raw_headers, Mapping) else raw_headers
    return [(str(k), v if isinstance(v, bytes) else str(v).encode()) for k, v in pairs]


def _observe(outcome: handling.Outcome) -> None:
    """The command's trace and correlation ids for the logs, and its outcome counted."""
    if outcome.command is not None:
        trace_id_var.set(outcome.command.trace_id)
        correlation_id_var.set(outcome.command.correlation_id or outcome.command.command_id)
    command_type = outcome.command.type if outcome.command else "unparsed"
    COMMAND_OUTCOMES.labels(command_type, outcome.outcome_label).inc()


def count_chargebacks(events: Iterable[Event]) -> None:
    """``escrow_chargebacks_total{outcome}``: opened, won, lost (a lost one on held funds is
    the EscrowRefunded with reason CHARGEBACK)."""
    for event in events:
        if isinstance(event.data, ChargebackOpenedData):
            CHARGEBACKS.labels("opened").inc()
        elif isinstance(event.data, ChargebackClosedData):
            CHARGEBACKS.labels(event.data.outcome.value.lower()).inc()
        elif isinstance(event.data, EscrowRefundedData) and event.data.reason == CHARGEBACK_REASON:
            CHARGEBACKS.labels("lost").inc()


def _dlq_headers(message: Any, dead: handling.DeadLetter, size: int) -> list[tuple[str, bytes]]:
    headers = [
        ("x-dlq-reason", dead.reason.value.encode()),
        ("x-dlq-error", dead.detail.encode("utf-8", "replace")),
        ("x-dlq-source-topic", str(message.topic).encode()),
        ("x-dlq-source-partition", str(message.partition).encode()),
        ("x-dlq-source-offset", str(message.offset).encode()),
    ]
    if size > DLQ_VALUE_BYTES_MAX:
        headers.append(("x-dlq-truncated-from-bytes", str(size).encode()))
    return headers
