"""The faust.App and its settings: the one composition root.

``faust -A escrow_stream.app …`` and ``escrow-stream worker`` both load ``app`` from here.
Nothing is built at import: the first use of ``app`` (or ``settings``) reads the environment
once and builds the app; a production start-up with missing variables stops there with the
deployment document's message, before anything else.
"""

from __future__ import annotations

import functools
import os
import ssl
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import faust
import redis.asyncio
from faust.types import TableT

from escrow_stream import liveness, transport
from escrow_stream.agents import (
    deposit_screening,
    mirror,
    payment_effects,
    payouts,
    processor,
    relay,
    timeouts,
    unmatched,
)
from escrow_stream.agents import reconcile as reconcile_agent
from escrow_stream.agents.relay import OutboxPublisher
from escrow_stream.clock import Clock, utc_now
from escrow_stream.config import ConfigError, Settings, domain_settings, load_settings
from escrow_stream.db.kyc import KycDirectory
from escrow_stream.db.payouts import PayoutDirectory
from escrow_stream.db.pool import Database
from escrow_stream.db.unit_of_work import PostgresUnits
from escrow_stream.idempotency import IdempotencyStore, build_idempotency_store
from escrow_stream.intake import Intake
from escrow_stream.kafka import SharedAdmin
from escrow_stream.liveness import ProgressMonitor
from escrow_stream.messages import Topics
from escrow_stream.payments.custodian import CustodianClient, CustodianRail
from escrow_stream.payments.risk import RiskScreener
from escrow_stream.payments.stripe_connect import StripeConnect
from escrow_stream.payments.stripe_rail import StripeRail
from escrow_stream.redisconn import redis_client
from escrow_stream.storage import EvidenceStore
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.tables import outcomes as outcome_table
from escrow_stream.web import (
    admin,
    custodian_webhook,
    evidence,
    gateway,
    health,
    operations,
    reads,
    webhooks,
)
from escrow_stream.web import escrows as escrow_views
from escrow_stream.web import payment as payment_view
from escrow_stream.web import payouts as payout_views
from escrow_stream.web.cors import cors_options
from escrow_stream.web.middleware import make_middleware
from escrow_stream.web.ratelimit import MemoryCounter, RateLimiter, RedisCounter

#: The KYC listener's ``application_name`` in ``pg_stat_activity``.
KYC_LISTENER_NAME = "escrow-kyc-listener"
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


#: Something to close when the worker stops (a client, a pool).
Closer = Callable[[], Awaitable[None]]


def create_app(
    settings: Settings, clock: Clock = utc_now, new_id: Callable[[], str] = new_uuid
) -> faust.App:
    """Build the application and register everything on it: the Faust app, the command
    processor and its tables, payouts, payments effects, reconciliation, health and
    readiness, the web layer, the outbox relay, and closing the clients at shutdown."""
    shared_redis = redis_client(settings)
    limiter = rate_limiter(settings, shared_redis)
    app = faust_app(settings, clock, limiter)
    database = Database(settings)
    core = register_processing(app, settings, clock, database)
    publisher = OutboxPublisher(settings, database, clock)
    screener = RiskScreener(settings)
    closers: list[Closer] = [database.close, screener.aclose]
    payout_service = payouts.PayoutService(
        settings, clock, database, screener, StripeConnect(settings), publisher
    )
    payouts.register(app, payout_service, core.escrows)
    if settings.payments_effects_enabled:
        closers += register_payments(app, settings, clock, database, core, publisher, screener)
    if settings.reconcile_interval_minutes > 0:
        reconciler = reconcile_agent.ProviderReconciler(settings, clock, database)
        reconcile_agent.register(app, reconciler)
    health.register(app, clock, core.progress)
    operations.register(
        app, readiness_checks(app, settings, database, shared_redis, closers), settings.api_url
    )
    if settings.metrics_enabled:
        operations.serve_metrics_alone(app, settings.metrics_port)
    idempotency = build_idempotency_store(settings, database, shared_redis)
    services = WebServices(database, core, limiter, publisher, payout_service, idempotency)
    register_web(app, settings, clock, new_id, services)
    relay.register(app, publisher, idempotency, clock)
    close_at_shutdown(app, closers, shared_redis)
    return app


def faust_app(settings: Settings, clock: Clock, limiter: RateLimiter) -> faust.App:
    """The Faust app and its settings (broker, tables, web server, its middleware)."""
    return transport.App(
        settings.kafka_group_id,
        broker=settings.broker_urls,
        broker_client_id=settings.kafka_client_id,
        broker_credentials=_credentials(settings),
        store=settings.table_store,
        TableManager=transport.TableManager,
        datadir=settings.data_dir,
        processing_guarantee=settings.kafka_processing_guarantee,
        topic_partitions=TABLE_PARTITIONS,
        topic_replication_factor=settings.kafka_replication_factor,
        web_bind=settings.web_host,  # the address to listen on ...
        web_host=settings.web_host,
        web_port=settings.port,
        canonical_url=settings.canonical_url,  # ... and how other workers reach this one
        # Faust's /table/ views would expose raw escrow state to anyone: off (SPEC §4).
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_in_thread=False,
        producer_max_request_size=1_048_576,
        broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
        broker_commit_interval=settings.kafka_commit_interval_ms / 1000,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_ms / 3000),
        autodiscover=["escrow_stream.faust_cli"],
        origin="escrow_stream.app",
        web_cors_options=cors_options(settings),
        web_application_options={
            "middlewares": [make_middleware(limiter, clock, settings)],
            "client_max_size": settings.http_body_max_bytes,
        },
    )


@dataclass(frozen=True)
class Processing:
    """What the command processor's side gives the rest of the app."""

    topics: Topics
    escrows: TableT[str, Any]
    recorded_outcomes: TableT[str, Any]
    kyc: KycDirectory
    progress: ProgressMonitor


def register_processing(
    app: faust.App, settings: Settings, clock: Clock, database: Database
) -> Processing:
    """The topics and tables, the command processor, its liveness, the timeouts and the
    PostgreSQL mirror of the events."""
    topics = Topics(app, settings)
    escrows = escrow_table.define(app, TABLE_PARTITIONS)
    recorded_outcomes = outcome_table.define(app, TABLE_PARTITIONS)
    kyc = KycDirectory(database)
    progress = ProgressMonitor(
        settings.kafka_commands_topic,
        settings.stall_timeout_s,
        transactional=settings.kafka_processing_guarantee == "exactly_once",
    )
    payouts = PayoutDirectory(database)
    commands = processor.CommandProcessor(
        app, settings, clock, topics, escrows, recorded_outcomes, kyc.verified, payouts.active
    )
    processor.register(app, commands, progress)
    liveness.register(app, progress)
    timeouts.register(app, settings, clock, topics.commands, escrows, domain_settings(settings))
    mirror.register(app, topics.events, database)
    return Processing(topics, escrows, recorded_outcomes, kyc, progress)


def register_payments(
    app: faust.App,
    settings: Settings,
    clock: Clock,
    database: Database,
    core: Processing,
    publisher: OutboxPublisher,
    screener: RiskScreener,
) -> list[Closer]:
    """The payments effects on both rails, deposit screening and unmatched funds returns
    (``PAYMENTS_EFFECTS_ENABLED``); what they need closed at shutdown."""
    custodian = CustodianClient(settings)
    stripe_rail = StripeRail(settings)
    rails: dict[str, payment_effects.Rail] = {
        "STRIPE": stripe_rail,
        "USDC_BASE": CustodianRail(custodian),
    }
    effects = payment_effects.PaymentEffects(settings, clock, database, rails, publisher, screener)
    payment_effects.register(app, effects, core.topics.events)
    deposit_screening.register(
        app,
        deposit_screening.DepositScreening(settings, clock, database, screener, publisher),
    )
    returns = unmatched.UnmatchedReturns(settings, clock, database, stripe_rail, custodian)
    unmatched.register(app, returns, core.topics.rejections)
    return [custodian.aclose]


@dataclass(frozen=True)
class WebServices:
    """The adapters and services the web layer is built on."""

    database: Database
    core: Processing
    limiter: RateLimiter
    publisher: OutboxPublisher
    payout_service: payouts.PayoutService
    idempotency: IdempotencyStore


def register_web(
    app: faust.App,
    settings: Settings,
    clock: Clock,
    new_id: Callable[[], str],
    services: WebServices,
) -> None:
    """The HTTP API: escrows, evidence, payment and payouts, the webhooks, admin."""
    database, core = services.database, services.core
    internal_secret = settings.internal_command_secret.get_secret_value()
    reader = reads.EscrowReader(
        reads.partition_owner(app, core.topics.commands),
        core.escrows,
        core.recorded_outcomes,
        reads.signed_fetch(internal_secret, clock),
    )
    intake = Intake(
        PostgresUnits(database),
        services.idempotency,
        clock,
        settings.kafka_commands_topic,
        internal_secret,
        services.publisher.notify,
    )
    front = gateway.Gateway(settings, clock, services.limiter)
    evidence_store = EvidenceStore.from_settings(settings, new_id)
    escrow_api = escrow_views.EscrowApi(
        front,
        reader,
        intake,
        database,
        core.kyc,
        domain_settings(settings),
        settings.feature_kyc_gating,
        new_id,
        check_evidence=functools.partial(evidence.check_evidence, evidence_store),
    )
    escrow_views.register(app, escrow_api)
    if settings.feature_kyc_gating:
        listen_for_kyc_changes(app, settings, core.kyc)
    hooks = webhooks.WebhookServices(
        settings,
        clock,
        intake,
        database,
        confirm_return=functools.partial(unmatched.confirm_return, database, clock),
        account_updated=payout_views.account_updated_handler(services.payout_service, clock),
    )
    webhooks.register(app, hooks)
    custodian_webhook.register(app, hooks)
    evidence.register(app, front, reader, evidence_store)
    payment_view.register(app, front, database)
    payout_views.register(app, front, services.payout_service)
    admin.register(app, front, database)


def listen_for_kyc_changes(app: faust.App, settings: Settings, kyc: KycDirectory) -> None:
    """Keep ``kyc``'s cache of VERIFIED users current while the worker runs, on a connection
    of its own (``db/kyc.py``; the processor and the gateway both look users up in it)."""
    connect = functools.partial(
        asyncpg.connect,
        settings.database_url.get_secret_value(),
        server_settings={"application_name": KYC_LISTENER_NAME},
    )

    @app.task  # type: ignore[untyped-decorator]
    async def kyc_status_listener() -> None:
        await kyc.listen(connect)


def close_at_shutdown(
    app: faust.App, closers: list[Closer], shared_redis: redis.asyncio.Redis | None
) -> None:
    """Close ``closers`` (as the list stands then) and the shared Redis client at shutdown,
    once every service that uses them has stopped (:class:`transport.App`)."""

    async def _close_clients() -> None:
        for close in closers:
            await close()
        if shared_redis is not None:
            await shared_redis.aclose()

    cast(transport.App, app).closers.append(_close_clients)


def rate_limiter(settings: Settings, client: redis.asyncio.Redis | None) -> RateLimiter:
    """Counts shared through Redis (per app id) when there is a client, else in-process."""
    counter: MemoryCounter | RedisCounter = MemoryCounter()
    if client is not None:
        counter = RedisCounter(client, namespace=settings.kafka_group_id)
    return RateLimiter(
        counter, settings.rate_limit_per_ip_per_minute, settings.rate_limit_per_user_per_minute
    )


def readiness_checks(
    app: faust.App,
    settings: Settings,
    database: Database,
    shared_redis: redis.asyncio.Redis | None,
    closers: list[Closer],
) -> operations.Readiness:
    """What ``/ready`` asks, reusing the process's clients: the processor has joined its
    group and recovered its tables, the broker answers, the database, Redis when configured."""
    admin = SharedAdmin(settings)
    closers.append(admin.close)

    async def processor() -> None:
        if not liveness.processing_ready(app):
            raise RuntimeError("not assigned yet, rebalancing or recovering tables")

    async def kafka() -> None:
        await admin.describe_cluster()

    async def postgres() -> None:
        pool = await database.pool()
        await pool.fetchval("SELECT 1")

    checks: dict[str, operations.Check] = {
        "processor": processor,
        "kafka": kafka,
        "postgres": postgres,
    }
    if shared_redis is not None:

        async def redis_check() -> None:
            await shared_redis.ping()

        checks["redis"] = redis_check
    return operations.Readiness(checks)


def _load() -> Settings:
    try:
        return load_settings(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


_built: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """``app`` and ``settings``, built on first use (PEP 562), not at import: importing this
    module (tests, tools) reads no environment and builds nothing; ``faust -A
    escrow_stream.app`` and ``escrow-stream worker`` ask for ``app`` and get it built once."""
    if name not in ("app", "settings"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _built:
        loaded = _load()
        _built["settings"] = loaded
        _built["app"] = create_app(loaded)
    return _built[name]
