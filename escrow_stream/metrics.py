"""Prometheus metrics of the worker (SPEC §9): commands, events, dead letters, mirror,
providers, webhooks, HTTP, the database pool.  Every metric is defined here, once; the
dashboard (``deploy/grafana``) and the alert rules (``deploy/prometheus``) name only these."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

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
TIMEOUTS_OVERDUE = Gauge(
    "escrow_timeouts_overdue",
    "Escrows of this worker's partitions still not terminal past a deadline (a timeout "
    "command was due) at the last timeout scan (aggregate with sum); one that stays above 0 "
    "over several scans means timeout commands are not taking effect.",
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

WORKER_READY = Gauge(
    "escrow_worker_ready",
    "1 when this worker last answered GET /ready with 200, 0 when with 503 (as fresh as the "
    "readiness probes that ask it; -1 until first asked).",
)
WORKER_READY.set(-1)

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

# -- webhooks (escrow_stream/web/webhooks.py, web/custodian_webhook.py) --

WEBHOOKS = Counter(
    "escrow_webhooks_total",
    "Webhook deliveries by source (stripe, custodian) and result: accepted (acted on: a "
    "command enqueued, a deposit recorded, a return or account updated), duplicate (an event "
    "already handled, answered again), ignored (not one we act on), bad_signature, invalid "
    "(signed but malformed), in_flight (its twin is being handled: 409), error (500/503).",
    ["source", "result"],
)

# -- payment and screening providers (payments/stripe_rail.py, custodian.py, risk.py) --

PROVIDER_REQUESTS = Counter(
    "escrow_provider_requests_total",
    "HTTP requests to providers, every attempt (retries too), by provider (stripe, "
    "custodian, trm, chainalysis) and result (ok: 2xx; client_error: other 4xx; "
    "rate_limited: 429; server_error: 5xx; network_error: no answer, e.g. a timeout).",
    ["provider", "result"],
)
PROVIDER_SECONDS = Histogram(
    "escrow_provider_request_seconds",
    "Time of one HTTP request to a provider (one attempt), by provider.",
    ["provider"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


def provider_result(status: int | None) -> str:
    """The ``result`` label of one provider request: its HTTP status, None for no answer."""
    if status is None:
        return "network_error"
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    return "client_error"


def observe_provider_call(provider: str, status: int | None, seconds: float) -> None:
    PROVIDER_REQUESTS.labels(provider, provider_result(status)).inc()
    PROVIDER_SECONDS.labels(provider).observe(seconds)


class _HasStatus(Protocol):
    @property
    def status_code(self) -> int: ...


ResponseT = TypeVar("ResponseT", bound=_HasStatus)


async def metered(provider: str, request: Awaitable[ResponseT]) -> ResponseT:
    """Await one HTTP request to ``provider`` (an httpx call), counting it and its time; an
    exception (no answer) is counted ``network_error`` and raised again."""
    started = time.perf_counter()
    try:
        response = await request
    except Exception:
        observe_provider_call(provider, None, time.perf_counter() - started)
        raise
    observe_provider_call(provider, response.status_code, time.perf_counter() - started)
    return response


# -- the PostgreSQL pool (escrow_stream/db/pool.py), read when scraped --

DB_POOL_IN_USE = Gauge(
    "escrow_db_pool_in_use",
    "Connections of this process's PostgreSQL pool checked out right now.",
)
DB_POOL_SIZE = Gauge(
    "escrow_db_pool_size", "Open connections of this process's PostgreSQL pool (in use + idle)."
)
DB_POOL_MAX = Gauge(
    "escrow_db_pool_max", "The most connections the pool opens (DATABASE_POOL_SIZE)."
)


class _Pool(Protocol):
    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def get_max_size(self) -> int: ...


#: The pool the gauges read (the process's ``db.pool.Database``; none: all 0).
_watched: list[_Pool] = []


def watch_pool(pool: _Pool) -> None:
    """Report ``pool`` from now on (the latest one opened in this process)."""
    _watched[:] = [pool]


def unwatch_pool(pool: _Pool) -> None:
    """``pool`` was closed: report nothing for it any more."""
    if _watched and _watched[0] is pool:
        _watched.clear()


def _pool_reading(read: Callable[[_Pool], int]) -> Callable[[], float]:
    return lambda: float(read(_watched[0])) if _watched else 0.0


DB_POOL_IN_USE.set_function(_pool_reading(lambda p: p.get_size() - p.get_idle_size()))
DB_POOL_SIZE.set_function(_pool_reading(lambda p: p.get_size()))
DB_POOL_MAX.set_function(_pool_reading(lambda p: p.get_max_size()))


# -- Idempotency-Key stores (escrow_stream/idempotency/) --

IDEMPOTENCY_FALLBACKS = Counter(
    "escrow_idempotency_fallbacks_total",
    "Idempotency-Key requests kept in the database store because Redis was unavailable.",
)
