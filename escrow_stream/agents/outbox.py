"""The outbox relay inside the worker, alone as ``escrow-stream outbox-publisher``, and the
daily cleanup of expired idempotency keys."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, cast

import faust

from escrow_stream.clock import Clock, utc_now
from escrow_stream.config import Settings
from escrow_stream.db.outbox import OutboxPublisher
from escrow_stream.db.pool import Database
from escrow_stream.idempotency import IdempotencyStore

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 24 * 60 * 60.0


def register(
    app: faust.App, publisher: OutboxPublisher, idempotency: IdempotencyStore, clock: Clock
) -> None:
    stopping = asyncio.Event()

    @app.task  # type: ignore[untyped-decorator]
    async def relay_outbox() -> None:
        await publisher.run(stopping)

    @app.timer(interval=PURGE_INTERVAL_S, on_leader=True)  # type: ignore[untyped-decorator]
    async def purge_idempotency_keys() -> None:
        purged = await idempotency.purge_expired(clock())
        log.info("idempotency: purged %d expired key(s)", purged)

    async def stop(sender: object, *args: object, **kwargs: object) -> None:
        stopping.set()
        await publisher.close()

    app.on_before_shutdown.connect(cast(Any, stop))


async def run_standalone(settings: Settings) -> None:
    """The seed's separate outbox-publisher deployment: relay until SIGTERM or SIGINT."""
    database = Database(settings)
    publisher = OutboxPublisher(settings, database, utc_now)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("outbox publisher started")
    try:
        await publisher.run(stopping)
    finally:
        await publisher.close()
        await database.close()
    log.info("outbox publisher stopped")
