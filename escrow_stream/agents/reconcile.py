"""Provider reconciliation: ``escrow-stream reconcile --providers`` and its worker loop.

One run (:func:`reconcile_providers`), in order:

1. List Stripe's PaymentIntents, Transfers and Refunds and the custodian's deposits and
   transfers created since ``since - LISTING_MARGIN`` (``payments/listing.py``).
2. Read our side for this deployment from PostgreSQL (``db/reconciliation.py``): the rows
   begun since ``since`` and those the listed objects name.
3. Compare, purely (``domain/reconcile.py``): every difference, once.

In the worker (``RECONCILE_INTERVAL_MINUTES`` > 0): a task runs it ``FIRST_RUN_DELAY_S``
after start-up and then every interval, over the last ``DEFAULT_WINDOW``, on one worker of
the deployment at a time (a PostgreSQL advisory lock keyed by the commands topic, held for
the run; a worker that does not get it skips that round).  Each difference is logged as a
warning (its JSON), and the gauges ``escrow_reconcile_differences{provider,kind}`` (the last
run's counts, zeros included) and ``escrow_reconcile_last_run_timestamp`` are set.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import faust

from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.db import reconciliation
from escrow_stream.db.pool import Database
from escrow_stream.domain.reconcile import (
    CUSTODIAN,
    LISTING_MARGIN,
    STRIPE,
    Difference,
    Kind,
    ProviderObject,
    compare,
)
from escrow_stream.metrics import RECONCILE_DIFFERENCES, RECONCILE_LAST_RUN
from escrow_stream.payments.custodian import CustodianClient
from escrow_stream.payments.listing import list_custodian, list_stripe
from escrow_stream.payments.stripe_rail import stripe_client

log = logging.getLogger(__name__)

#: The window of a run when none is given (the CLI's default ``--since``, the worker's).
DEFAULT_WINDOW = timedelta(days=7)
FIRST_RUN_DELAY_S = 5.0
PROVIDERS = (STRIPE, CUSTODIAN)


@dataclass(frozen=True)
class Report:
    since: datetime
    differences: list[Difference]
    listed: dict[str, int]  # provider objects listed, by "provider.object"

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "summary",
            "since": self.since.isoformat(),
            "differences": len(self.differences),
            "listed": self.listed,
        }


async def reconcile_providers(settings: Settings, database: Database, since: datetime) -> Report:
    """Steps 1-3 of the module docstring."""
    custodian = CustodianClient(settings)
    try:
        listed_since = since - LISTING_MARGIN
        theirs: list[ProviderObject] = await list_stripe(stripe_client(settings), listed_since)
        theirs += await list_custodian(custodian, listed_since)
    finally:
        await custodian.aclose()
    pool = await database.pool()
    ours = await reconciliation.load(pool, settings.kafka_commands_topic, since, theirs)
    listed = Counter(f"{o.provider}.{o.object.value}" for o in theirs)
    return Report(since, compare(ours, theirs, since), dict(sorted(listed.items())))


def record_metrics(report: Report, finished_at: datetime) -> None:
    counts = Counter((d.provider, d.kind.value) for d in report.differences)
    for provider in PROVIDERS:
        for kind in Kind:
            RECONCILE_DIFFERENCES.labels(provider, kind.value).set(counts[(provider, kind.value)])
    RECONCILE_LAST_RUN.set(finished_at.timestamp())


class ProviderReconciler:
    """The worker's loop around :func:`reconcile_providers`."""

    def __init__(self, settings: Settings, clock: Clock, database: Database) -> None:
        self._settings = settings
        self._clock = clock
        self._database = database
        self.interval_s = settings.reconcile_interval_minutes * 60.0

    async def run_once(self) -> Report | None:
        """One run under the deployment's advisory lock; None when another worker holds it."""
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext($1))",
                f"escrow-reconcile:{self._settings.kafka_commands_topic}",
            )
            if not locked:
                log.info("provider reconciliation: another worker is running it")
                return None
            report = await reconcile_providers(
                self._settings, self._database, self._clock() - DEFAULT_WINDOW
            )
        for difference in report.differences:
            log.warning(
                "reconciliation difference: %s", json.dumps(difference.as_json(), sort_keys=True)
            )
        record_metrics(report, self._clock())
        log.info("provider reconciliation: %s", json.dumps(report.summary(), sort_keys=True))
        return report


def register(app: faust.App, reconciler: ProviderReconciler) -> None:
    @app.task  # type: ignore[untyped-decorator]
    async def provider_reconciliation() -> None:
        await asyncio.sleep(FIRST_RUN_DELAY_S)
        while not app.should_stop:
            try:
                await reconciler.run_once()
            except Exception:  # a provider or the database is away: the next round
                log.exception(
                    "provider reconciliation failed; next round in %ss", reconciler.interval_s
                )
            await asyncio.sleep(reconciler.interval_s)
