"""Prometheus metrics of the worker (SPEC §9): commands, events, dead letters, mirror."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

COMMAND_OUTCOMES = Counter(
    "escrow_commands_total",
    "Commands handled, by command type and outcome "
    "(accepted, duplicate, no_op, rejected, dead_letter).",
    ["type", "outcome"],
)
COMMAND_SECONDS = Histogram(
    "escrow_command_decide_seconds",
    "Time to decide one command (state read to outcome, excluding sends).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
DEAD_LETTERS = Counter(
    "escrow_dead_letters_total", "Messages sent to the commands DLQ, by reason.", ["reason"]
)
TIMEOUT_COMMANDS = Counter(
    "escrow_timeout_commands_total", "Timeout commands sent by the timeout processor.", ["type"]
)
MIRROR_EVENTS = Counter(
    "escrow_mirror_events_total",
    "Events seen by the PostgreSQL mirror, by result "
    "(applied, duplicate, skipped_offset, invalid).",
    ["result"],
)
