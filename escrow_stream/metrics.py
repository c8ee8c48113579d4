"""Prometheus metrics of the worker (SPEC §9): commands, events, dead letters, mirror."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
SETTLEMENT_MISMATCHES = Counter(
    "escrow_settlement_mismatches_total",
    "Settlement results refused SETTLEMENT_MISMATCH (they named another settlement than the "
    "pending one), by command type.",
    ["type"],
)
UNMATCHED_FUNDS = Counter(
    "escrow_unmatched_funds_total",
    "Money no escrow accepted (SPEC §10), counted each time it is recorded with or moves to "
    "a status (RETURNING, RETURNED, FROZEN, NEEDS_REVIEW), by provider and reason.",
    ["provider", "reason", "status"],
)
CHARGEBACKS = Counter(
    "escrow_chargebacks_total",
    "Card chargebacks (SPEC §10) as the escrows recorded them, by outcome (opened, won, lost); "
    "counted by the command processor once per event, never for a redelivered command.",
    ["outcome"],
)
STRIPE_HOLDS_PAST_WARNING = Gauge(
    "escrow_stripe_holds_past_warning",
    "STRIPE escrows still holding funds more than STRIPE_HOLD_WARN_DAYS after funding, among "
    "the escrows of this worker's partitions, set by each timeout scan (aggregate with sum).",
)
PAYMENT_EFFECTS = Counter(
    "escrow_payment_effects_total",
    "Provider calls of the payments agent, by effect (instructions, settlement) and result "
    "(succeeded, failed: refused for good, retry: outcome unknown, retried later).",
    ["effect", "result"],
)
DEAD_LETTERS = Counter(
    "escrow_dead_letters_total", "Messages sent to the commands DLQ, by reason.", ["reason"]
)
SETTLEMENTS_AWAITING_PAYOUT = Gauge(
    "escrow_settlements_awaiting_payout_account",
    "Releases waiting for the seller's ACTIVE payout account, counted on the PostgreSQL "
    "mirror by the payout sweep (every worker reports the same total: aggregate with max).",
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
RECONCILE_DIFFERENCES = Gauge(
    "escrow_reconcile_differences",
    "Differences the last provider reconciliation in this worker found (RECONCILE_INTERVAL_"
    "MINUTES), by provider (stripe, custodian) and kind (missing_on_our_side, "
    "missing_at_provider, amount_differs, status_differs).",
    ["provider", "kind"],
)
RECONCILE_LAST_RUN = Gauge(
    "escrow_reconcile_last_run_timestamp",
    "Unix time of the last completed provider reconciliation in this worker (0: none yet).",
)

# -- liveness (escrow_stream/liveness.py) --

CONSUMER_LAG = Gauge(
    "escrow_consumer_lag",
    "Messages on an assigned command partition not yet processed by this worker.",
    ["topic", "partition"],
)
LAST_PROGRESS = Gauge(
    "escrow_processor_last_progress_timestamp",
    "Unix time at which this worker last finished processing a command.",
)
STALLED = Gauge(
    "escrow_processor_stalled",
    "1 while an assigned command partition has had lag and no progress for STALL_TIMEOUT_S.",
)

# -- the outbox relay (escrow_stream/agents/relay.py) --

OUTBOX_PUBLISHED = Counter("escrow_outbox_published_total", "Outbox rows sent to Kafka.")
OUTBOX_DEAD_LETTERS = Counter(
    "escrow_outbox_dead_letters_total",
    "Outbox rows given up after their last failed attempt (see `outbox replay`).",
)
OUTBOX_PENDING = Gauge(
    "escrow_outbox_pending", "Outbox rows neither published nor dead-lettered (last batch)."
)
OUTBOX_LAG = Gauge(
    "escrow_outbox_lag_seconds", "Age of the oldest pending outbox row (0 when none)."
)

# -- HTTP (escrow_stream/web/middleware.py) --

HTTP_REQUESTS = Counter(
    "escrow_http_requests_total",
    "HTTP requests by route and status.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "escrow_http_request_seconds",
    "HTTP request latency by route.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

# -- Idempotency-Key stores (escrow_stream/idempotency/) --

IDEMPOTENCY_FALLBACKS = Counter(
    "escrow_idempotency_fallbacks_total",
    "Idempotency-Key requests kept in the database store because Redis was unavailable.",
)
