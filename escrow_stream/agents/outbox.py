"""The outbox relay inside the worker, alone as ``escrow-stream outbox-publisher``, and the
daily cleanup of expired idempotency keys."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import UTC
from typing import Any

import faust
from mode import Service
from prometheus_client import start_http_server

from escrow_stream.clock import Clock, utc_now
from escrow_stream.config import Settings
from escrow_stream.db.outbox import OutboxPublisher
from escrow_stream.db.pool import Database
from escrow_stream.idempotency import IdempotencyStore

log = logging.getLogger(__name__)

#: The daily cleanup of expired idempotency records (UTC), on the leader only.
PURGE_CRONTAB = "17 3 * * *"
#: How long stopping waits for the batch in progress (sends time out well before).
STOP_WAIT_S = 60.0


class OutboxRelay(Service):
    """:meth:`OutboxPublisher.run` as a service of the worker.

    1. Started with the app (it needs PostgreSQL and the brokers, not the tables).
    2. On stop: ask the loop to stop, wait (at most ``STOP_WAIT_S``) for the batch in
       progress to be marked, then stop the producer.
    """

    def __init__(self, publisher: OutboxPublisher, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._publisher = publisher
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False

    @Service.task
    async def _relay(self) -> None:
        self._running = True
        try:
            await self._publisher.run(self._stopping)
        finally:
            self._finished.set()

    async def on_stop(self) -> None:
        self._stopping.set()
        if self._running:
            try:
                await asyncio.wait_for(self._finished.wait(), STOP_WAIT_S)
            except TimeoutError:
                log.warning("outbox relay: batch still running after %.0f s", STOP_WAIT_S)
        await self._publisher.close()


def register(
    app: faust.App, publisher: OutboxPublisher, idempotency: IdempotencyStore, clock: Clock
) -> OutboxRelay:
    """Run ``publisher`` with the worker, and purge expired idempotency records daily."""
    relay = OutboxRelay(publisher)
    app.add_dependency(relay)

    @app.crontab(PURGE_CRONTAB, timezone=UTC, on_leader=True)
    async def purge_idempotency_keys() -> None:
        purged = await idempotency.purge_expired(clock())
        log.info("idempotency: purged %d expired record(s)", purged)

    return relay


async def run_standalone(settings: Settings, clock: Clock = utc_now) -> None:
    """The seed's separate outbox-publisher deployment.

    1. Serve the Prometheus metrics on ``METRICS_PORT`` when ``METRICS_ENABLED``.
    2. Relay until SIGTERM or SIGINT.
    3. Finish the batch in progress, stop the producer, close the pool, return (exit 0).
    """
    if settings.metrics_enabled:
        start_http_server(settings.metrics_port, addr=settings.web_host)
    database = Database(settings)
    publisher = OutboxPublisher(settings, database, clock)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("outbox publisher started")
    try:
        await publisher.run(stopping)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await publisher.close()
        await database.close()
    log.info("outbox publisher stopped")
