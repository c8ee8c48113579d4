"""The faust.App and its settings: the one composition root.

``faust -A escrow_stream.app …`` and ``escrow-stream worker`` both load ``app`` from here.
Configuration is read from the environment once, at import; a production start-up with
missing variables stops here with the deployment document's message, before anything else.
"""

from __future__ import annotations

import os
import ssl
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp_cors
import faust
import redis.asyncio

from escrow_stream import transport
from escrow_stream.agents import mirror, payments, processor, screening, timeouts
from escrow_stream.agents import outbox as outbox_agent
from escrow_stream.clock import Clock, utc_now
from escrow_stream.config import ConfigError, Settings, load_settings
from escrow_stream.db.kyc import KycDirectory
from escrow_stream.db.outbox import OutboxPublisher
from escrow_stream.db.pool import Database
from escrow_stream.idempotency import build_idempotency_store
from escrow_stream.kafka import topic_partitions
from escrow_stream.payments.custodian import CustodianClient, CustodianRail
from escrow_stream.payments.screening import RiskScreener
from escrow_stream.payments.stripe_rail import StripeRail
from escrow_stream.storage import EvidenceStore
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables import outcomes as outcome_table
from escrow_stream.web import evidence, gateway, health, operations, webhooks
from escrow_stream.web.middleware import make_middleware
from escrow_stream.web.ratelimit import MemoryCounter, RateLimiter, RedisCounter

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


def new_uuid() -> str:
    return str(uuid.uuid4())


def create_app(
    settings: Settings, clock: Clock = utc_now, new_id: Callable[[], str] = new_uuid
) -> faust.App:
    """Build the application and register everything on it."""
    shared_redis = redis_client(settings)
    limiter = rate_limiter(settings, shared_redis)
    app = transport.App(
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
        web_cors_options=cors_options(settings),
        web_application_options={
            "middlewares": [make_middleware(limiter, clock)],
            "client_max_size": settings.http_body_max_bytes,
        },
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
    publisher = OutboxPublisher(settings, database, clock)
    closers: list[Callable[[], Awaitable[None]]] = [database.close]
    if settings.payments_effects_enabled:
        custodian = CustodianClient(settings)
        rails: dict[str, payments.Rail] = {
            "STRIPE": StripeRail(settings),
            "USDC_BASE": CustodianRail(custodian),
        }
        payments.register(app, settings, clock, topics.events, topics.commands, rails)
        screener = RiskScreener(settings)
        closers += [custodian.aclose, screener.aclose]
        screening.register(
            app, screening.DepositScreening(settings, clock, database, screener, publisher)
        )
    health.register(app, clock)
    operations.register(app, readiness_checks(app, settings, database))
    if settings.metrics_enabled:
        operations.serve_metrics_alone(app, settings.metrics_port)

    reader = gateway.EscrowReader(app, topics, escrows, recorded_outcomes)
    idempotency = build_idempotency_store(settings, database, shared_redis)
    api = gateway.Gateway(
        app, settings, clock, new_id, reader, database, idempotency, publisher, limiter, kyc
    )
    gateway.register(app, api, topics)
    webhooks.register(app, api)
    webhooks.register_custodian(app, api)
    evidence.register(app, api, EvidenceStore.from_settings(settings, new_id))
    outbox_agent.register(app, publisher, idempotency, clock)

    async def _close_database(sender: object, *args: object, **kwargs: object) -> None:
        for close in closers:
            await close()
        if shared_redis is not None:
            await shared_redis.aclose()

    app.on_before_shutdown.connect(cast(Any, _close_database))

    return app


def redis_client(settings: Settings) -> redis.asyncio.Redis | None:
    """The process's one Redis client (connects on first use), when REDIS_URL is set."""
    if settings.redis_url is None:
        return None
    return redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value())


def rate_limiter(settings: Settings, client: redis.asyncio.Redis | None) -> RateLimiter:
    """Counts shared through Redis (per app id) when there is a client, else in-process."""
    counter: MemoryCounter | RedisCounter = MemoryCounter()
    if client is not None:
        counter = RedisCounter(client, namespace=settings.kafka_group_id)
    return RateLimiter(
        counter, settings.rate_limit_per_ip_per_minute, settings.rate_limit_per_user_per_minute
    )


def cors_options(settings: Settings) -> dict[str, aiohttp_cors.ResourceOptions]:
    """CORS for the origins in CORS_ORIGINS (none: browsers on other origins are refused)."""
    return {
        origin: aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
            allow_credentials=False,
            allow_headers=(
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Prefer",
                "X-Request-Id",
            ),
            expose_headers=(
                "X-Request-Id",
                "Retry-After",
                "Preference-Applied",
                "Idempotent-Replayed",
            ),
            allow_methods=("GET", "POST"),
            max_age=600,
        )
        for origin in settings.cors_origins
    }


def readiness_checks(
    app: faust.App, settings: Settings, database: Database
) -> dict[str, operations.Check]:
    """What ``/ready`` asks: the broker, the database, and Redis when configured."""

    async def kafka() -> None:
        await topic_partitions(settings, settings.kafka_commands_topic)

    async def postgres() -> None:
        pool = await database.pool()
        await pool.fetchval("SELECT 1")

    checks: dict[str, operations.Check] = {"kafka": kafka, "postgres": postgres}
    if settings.redis_url is not None:
        redis_url = settings.redis_url.get_secret_value()

        async def redis_check() -> None:
            client = redis.asyncio.Redis.from_url(redis_url)
            try:
                await client.ping()
            finally:
                await client.aclose()

        checks["redis"] = redis_check
    return checks


def _load() -> Settings:
    try:
        return load_settings(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


settings = _load()
app = create_app(settings)
