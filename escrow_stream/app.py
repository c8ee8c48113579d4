"""The faust.App and its settings: the one composition root.

``faust -A escrow_stream.app …`` and ``escrow-stream worker`` both load ``app`` from here.
Configuration is read from the environment once, at import; a production start-up with
missing variables stops here with the deployment document's message, before anything else.
"""

from __future__ import annotations

import os
import ssl
import sys

import faust

from escrow_stream.clock import Clock, utc_now
from escrow_stream.config import ConfigError, Settings, load_settings
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
    )
    health.register(app, clock)
    return app


def _load() -> Settings:
    try:
        return load_settings(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


settings = _load()
app = create_app(settings)
