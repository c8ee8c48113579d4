"""The timeout processor: a Faust timer that sends the timeout commands that are due.

Every ``ESCROW_TIMEOUT_POLL_INTERVAL_MINUTES`` each worker scans the escrows of the
partitions it owns (a table only iterates its active partitions), asks the domain which
timeout command is due (``timeout_command_for``) and sends it, signed, to
``escrow-commands``.  The commandId is derived from escrowId + status + version, so two
timers (or two scans before the first command is processed) produce the same command and
the escrow applies it once; the processor re-checks the deadline when it decides.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import faust
from faust.types import TableT

from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.domain import Command, DomainSettings, timeout_command_for
from escrow_stream.domain.timeouts import holds_card_funds_past
from escrow_stream.messages import encode_command, signed_headers
from escrow_stream.metrics import STRIPE_HOLDS_PAST_WARNING, TIMEOUT_COMMANDS, TIMEOUTS_OVERDUE
from escrow_stream.tables import escrows as escrow_table

log = logging.getLogger(__name__)


def due_timeouts(
    values: Iterable[bytes],
    now: datetime,
    rules: DomainSettings,
    hold_warn_days: int | None = None,
) -> list[Command]:
    """The timeout commands due at ``now`` among the stored escrow snapshots; with
    ``hold_warn_days``, also sets the gauge of STRIPE escrows holding funds past that many
    days (this worker's partitions: the scan is already paid for, so it is free here)."""
    due: list[Command] = []
    past_warning = 0
    for value in values:
        escrow = escrow_table.load(value)
        if escrow is None:
            continue
        command = timeout_command_for(escrow, now, rules)
        if command is not None:
            due.append(command)
        if hold_warn_days is not None and holds_card_funds_past(escrow, now, hold_warn_days):
            past_warning += 1
    if hold_warn_days is not None:
        STRIPE_HOLDS_PAST_WARNING.set(past_warning)
    return due


def register(
    app: faust.App,
    settings: Settings,
    clock: Clock,
    commands_topic: faust.TopicT,
    escrows: TableT[str, Any],
    rules: DomainSettings,
) -> None:
    secret = settings.internal_command_secret.get_secret_value()
    interval_s = settings.escrow_timeout_poll_interval_minutes * 60.0

    @app.timer(interval=interval_s, on_leader=False, name="escrow-timeouts")  # type: ignore[untyped-decorator]
    async def send_due_timeouts() -> None:
        # Collect first: sending yields to the loop, and the table may change meanwhile.
        due = due_timeouts(list(escrows.values()), clock(), rules, settings.stripe_hold_warn_days)
        TIMEOUTS_OVERDUE.set(len(due))  # not terminal past a deadline, this scan
        for command in due:
            body = encode_command(command)
            await commands_topic.send(
                key=command.escrow_id.encode(),
                value=body,
                headers=signed_headers(command, body, secret),
            )
            TIMEOUT_COMMANDS.labels(command.type).inc()
        if due:
            log.info("timeout processor sent %d command(s)", len(due))
