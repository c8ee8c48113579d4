"""The faust.App and its settings: the one composition root.

``faust -A escrow_stream.app …`` and ``escrow-stream worker`` both load ``app`` from here.
Configuration is read from the environment once, at import; a production start-up with
missing variables stops here with the deployment document's message, before anything else.
"""

from __future__ import annotations

import os
import ssl
import sys
from typing import Any, cast

import faust

from escrow_stream.agents import mirror, processor, timeouts
from escrow_stream.clock import Clock, utc_now
from escrow_stream.config import ConfigError, Settings, load_settings
from escrow_stream.db.kyc import KycDirectory
from escrow_stream.db.pool import Database
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables import outcomes as outcome_table
from escrow_stream.web import health

TABLE_PARTITIONS = 6  # changelog partitions = escrow-commands partitions (co-partitioned)


def _credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    ssl_context = ssl.create_default_context() if settings.kafka_ssl_enabled else None
    if settings.kafka_sasl_username is not None:
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else "",
            mechanism=settings.kafka_sasl_mechanism.upper(),
            ssl_context=ssl_context,
        )
    if ssl_context is not None:
        return faust.SSLCredentials(ssl_context)
    return None


def create_app(settings: Settings, clock: Clock = utc_now) -> faust.App:
    """Build the application and register everything on it."""
    app = faust.App(
        settings.kafka_group_id,
        broker=settings.broker_urls,
        broker_client_id=settings.kafka_client_id,
        broker_credentials=_credentials(settings),
        store=settings.table_store,
        datadir=settings.data_dir,
        processing_guarantee=settings.kafka_processing_guarantee,
        topic_partitions=TABLE_PARTITIONS,
        topic_replication_factor=settings.kafka_replication_factor,
        web_host=settings.web_host,
        web_port=settings.port,
        # Faust's /table/ views would expose raw escrow state to anyone: off (SPEC §4).
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_in_thread=False,
        producer_max_request_size=1_048_576,
        broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_ms / 3000),
        autodiscover=["escrow_stream.commands"],
        origin="escrow_stream.app",
    )
    database = Database(settings)
    topics = processor.Topics(app, settings)
    escrows = escrow_table.define(app, TABLE_PARTITIONS)
    recorded_outcomes = outcome_table.define(app, TABLE_PARTITIONS)
    kyc = KycDirectory(database)
    processor.register(app, settings, clock, topics, escrows, recorded_outcomes, kyc.verified)
    timeouts.register(
        app, settings, clock, topics.commands, escrows, processor.domain_settings(settings)
    )
    mirror.register(app, topics.events, database)
    health.register(app, clock)

    async def _close_database(sender: object, *args: object, **kwargs: object) -> None:
        await database.close()

    app.on_before_shutdown.connect(cast(Any, _close_database))

    return app


def _load() -> Settings:
    try:
        return load_settings(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


settings = _load()
app = create_app(settings)
