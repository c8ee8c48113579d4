"""Every environment variable of the deployment document, its default and its validation.

The names are the operator's contract (``seed/escrow-services-deployment.md``); the few
variables this implementation adds are listed in ``OURS``.  The environment is injected:
``load_settings(environ)`` reads a mapping, never ``os.environ`` behind the caller's back.

Startup order (numbered because it matters):

1. ``NODE_ENV=production``: every variable the seed marks required must be present and
   non-empty, otherwise :class:`MissingVariables` carries the seed's exact two-line message
   naming *all* of them at once.
2. Values are parsed and validated (types, enums, ranges, ``JWT_SECRET`` length).
3. In development any variable left out gets a safe local default (local broker, local
   database, obviously fake test keys, a development-only JWT secret that is announced as
   such on start-up).

This module is longer than the others on purpose: :class:`Settings` is one flat,
declarative list of every variable (the operator's contract, read top to bottom beside the
deployment document); split up, that contract would have no single place.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core.core_schema import ValidationInfo

from escrow_stream.domain import Currency, DomainSettings

JWT_SECRET_LENGTH_MIN = 64

#: Secrets checked in production: none may be its development default or shorter than this
#: (our own shared secrets are generated, so they can be long; providers' keys have their own
#: formats, and the minimum only rules out placeholders).
PRODUCTION_SECRET_LENGTH_MIN: dict[str, int] = {
    "jwt_secret": JWT_SECRET_LENGTH_MIN,
    "internal_command_secret": 32,
    "stripe_secret_key": 20,
    "stripe_webhook_secret": 20,
    "custodian_api_key": 16,
    "custodian_webhook_secret": 32,
    "trm_api_key": 16,
    "chainalysis_api_key": 16,
    "aws_secret_access_key": 16,
}

#: Obviously not a secret; only ever used outside production, and announced when it is.
DEV_JWT_SECRET = "dev-only-insecure-jwt-secret-" + "x" * (JWT_SECRET_LENGTH_MIN - 29)
DEV_INTERNAL_COMMAND_SECRET = "dev-only-insecure-internal-command-secret"

#: Required in production, in the seed's order (so the error message reads like the seed's).
REQUIRED_IN_PRODUCTION: tuple[str, ...] = (
    "NODE_ENV",
    "PORT",
    "DATABASE_URL",
    "DATABASE_URL_PRISMA",
    "KAFKA_BROKERS",
    "KAFKA_CLIENT_ID",
    "KAFKA_GROUP_ID",
    "API_URL",
    "WEB_APP_URL",
    "JWT_SECRET",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "CUSTODIAN_API_KEY",
    "CUSTODIAN_API_URL",
    "CUSTODIAN_WEBHOOK_SECRET",
    "TRM_API_KEY",
    "CHAINALYSIS_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_S3_BUCKET",
    "AWS_REGION",
    # Ours: signs system-role commands (SPEC §3, Trust); a default would be a shared secret.
    "INTERNAL_COMMAND_SECRET",
)

#: Variables this implementation adds to the seed's tables.
OURS: tuple[str, ...] = (
    "INTERNAL_COMMAND_SECRET",
    "ESCROW_DELIVERED_TIMEOUT_ACTION",
    "ESCROW_MAX_AMOUNT_MINOR",
    "ESCROW_MAX_AMOUNT_USD_MINOR",
    "ESCROW_MAX_AMOUNT_USDC_MINOR",
    "ESCROW_FEE_BPS",
    "ESCROW_RECENT_COMMANDS_MAX",
    "KAFKA_REJECTIONS_TOPIC",
    "KAFKA_DLQ_TOPIC",
    "KAFKA_REPLICATION_FACTOR",
    "KAFKA_COMPRESSION",
    "KAFKA_PROCESSING_GUARANTEE",
    "KAFKA_SESSION_TIMEOUT_MS",
    "KAFKA_COMMIT_INTERVAL_MS",
    "KAFKA_FETCH_MAX_WAIT_MS",
    "TABLE_STORE",
    "DATA_DIR",
    "WEB_HOST",
    "STRIPE_API_BASE",
    "PAYMENTS_EFFECTS_ENABLED",
    "PROVIDER_TIMEOUT_MS",
    "CUSTODIAN_MIN_CONFIRMATIONS",
    "AWS_ENDPOINT_URL",
    "HTTP_BODY_MAX_BYTES",
    "LOG_FORMAT",
    "RATE_LIMIT_PER_IP_PER_MINUTE",
    "RATE_LIMIT_PER_USER_PER_MINUTE",
    "STALL_TIMEOUT_S",
    "RECONCILE_INTERVAL_MINUTES",
    "WEB_CANONICAL_URL",
    "TRUSTED_PROXIES",
    "STRIPE_MAX_HOLD_DAYS",
    "STRIPE_HOLD_WARN_DAYS",
)

#: KAFKA_REPLICATION_FACTOR when it is unset: every partition (ours and Faust's changelogs) on
#: three brokers in production, so one broker down loses nothing; one broker locally.
REPLICATION_FACTOR_PRODUCTION_DEFAULT = 3
REPLICATION_FACTOR_DEVELOPMENT_DEFAULT = 1

#: Bind addresses that are no address another worker could call.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


class NodeEnv(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ConfigError(Exception):
    """The configuration cannot be used; ``str(err)`` is what the operator sees."""


class MissingVariables(ConfigError):
    """Production start-up without the variables the seed marks required."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(
            f"Error: Missing required environment variables: {', '.join(names)}\n"
            "Please check your .env file or environment configuration."
        )


_LOCAL_DATABASE_URL = "postgresql://escrow:escrow@127.0.0.1:5432/escrow"
LOCAL_STRIPE_MOCK = "http://127.0.0.1:12111"
#: The stack's S3 (``scripts/stack.sh up s3``), with its dev bucket ``escrow-stream-dev``.
LOCAL_S3 = "http://127.0.0.1:4566"


def _env(name: str, default: Any = None, **kwargs: Any) -> Any:
    return Field(default, alias=name, **kwargs)


class Settings(BaseModel):
    """The effective configuration; field aliases are the environment variable names."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    # Application
    node_env: NodeEnv = _env("NODE_ENV", NodeEnv.DEVELOPMENT)
    port: int = _env("PORT", 3000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "warn", "error", "critical"] = _env(
        "LOG_LEVEL", "info"
    )
    log_format: Literal["json", "text"] = _env("LOG_FORMAT", "json")
    web_host: str = _env("WEB_HOST", "0.0.0.0")
    #: How other workers reach this one (Faust's canonical_url); unset: http://WEB_HOST:PORT,
    #: or http://{hostname}:PORT when WEB_HOST is a wildcard such as 0.0.0.0.
    web_canonical_url: str | None = _env("WEB_CANONICAL_URL", None)
    #: Proxies (CIDRs) whose X-Forwarded-For names the client, e.g. the ingress's network.
    trusted_proxies: tuple[str, ...] = _env("TRUSTED_PROXIES", ())

    # Database
    database_url: SecretStr = _env("DATABASE_URL", SecretStr(_LOCAL_DATABASE_URL))
    database_url_prisma: SecretStr | None = _env("DATABASE_URL_PRISMA", None)
    database_pool_size: int = _env("DATABASE_POOL_SIZE", 10, ge=1, le=500)
    database_pool_timeout_ms: int = _env("DATABASE_POOL_TIMEOUT", 20000, ge=1)

    # Kafka
    kafka_brokers: str = _env("KAFKA_BROKERS", "127.0.0.1:9092", min_length=1)
    kafka_client_id: str = _env("KAFKA_CLIENT_ID", "escrow-stream-dev", min_length=1)
    kafka_group_id: str = _env("KAFKA_GROUP_ID", "escrow-stream", min_length=1)
    kafka_commands_topic: str = _env("KAFKA_COMMANDS_TOPIC", "escrow-commands")
    kafka_events_topic: str = _env("KAFKA_EVENTS_TOPIC", "escrow.events.v1")
    kafka_rejections_topic: str = _env("KAFKA_REJECTIONS_TOPIC", "escrow.rejections.v1")
    kafka_dlq_topic: str = _env("KAFKA_DLQ_TOPIC", "escrow-commands.dlq")
    kafka_sasl_username: str | None = _env("KAFKA_SASL_USERNAME", None)
    kafka_sasl_password: SecretStr | None = _env("KAFKA_SASL_PASSWORD", None)
    kafka_sasl_mechanism: Literal["plain", "scram-sha-256", "scram-sha-512"] = _env(
        "KAFKA_SASL_MECHANISM", "plain"
    )
    kafka_ssl_enabled: bool = _env("KAFKA_SSL_ENABLED", False)
    #: Unset: 3 with NODE_ENV=production, else 1 (``_replication_factor_default``).
    kafka_replication_factor: int = _env(
        "KAFKA_REPLICATION_FACTOR", REPLICATION_FACTOR_DEVELOPMENT_DEFAULT, ge=1, le=16
    )
    kafka_compression: Literal["snappy", "lz4", "gzip", "zstd", "producer"] = _env(
        "KAFKA_COMPRESSION", "snappy"
    )
    #: exactly_once: a command's table writes, events and offset commit in one Kafka
    #: transaction (README, "Kafka transactions"); at_least_once: consumers dedupe by eventId.
    kafka_processing_guarantee: Literal["at_least_once", "exactly_once"] = _env(
        "KAFKA_PROCESSING_GUARANTEE", "exactly_once"
    )
    #: How soon the group notices a crashed worker and hands its partitions to another.
    kafka_session_timeout_ms: int = _env("KAFKA_SESSION_TIMEOUT_MS", 30_000, ge=6_000, le=300_000)
    #: How often processed offsets are committed (Faust's ``broker_commit_interval``); under
    #: exactly_once each commit ends the transactions, so events become visible to
    #: read_committed consumers at this pace (``benchmarks.guarantee`` measures it).
    kafka_commit_interval_ms: int = _env("KAFKA_COMMIT_INTERVAL_MS", 2_800, ge=50, le=60_000)
    #: How long the broker may hold the worker's fetch for data to arrive (the consumer's
    #: ``fetch.max.wait.ms``; faust fixes 1500).  The consumer has one fetch in flight, and
    #: under exactly_once one that asks only for partitions with nothing committed yet (the
    #: events topic, mid-transaction) is held this long while new commands wait behind it.
    kafka_fetch_max_wait_ms: int = _env("KAFKA_FETCH_MAX_WAIT_MS", 50, ge=0, le=1_500)
    table_store: str = _env("TABLE_STORE", "rocksdb://")
    data_dir: str = _env("DATA_DIR", "escrow-stream-data")

    # API gateway
    api_url: str = _env("API_URL", "http://localhost:3000")
    web_app_url: str = _env("WEB_APP_URL", "http://localhost:5173")
    jwt_secret: SecretStr = _env("JWT_SECRET", SecretStr(DEV_JWT_SECRET))
    cors_origins: tuple[str, ...] = _env("CORS_ORIGINS", ())
    http_body_max_bytes: int = _env("HTTP_BODY_MAX_BYTES", 1_048_576, ge=1024)
    rate_limit_per_ip_per_minute: int = _env("RATE_LIMIT_PER_IP_PER_MINUTE", 100, ge=1)
    rate_limit_per_user_per_minute: int = _env("RATE_LIMIT_PER_USER_PER_MINUTE", 50, ge=1)

    # Escrow service
    escrow_payment_deadline_days: int = _env("ESCROW_PAYMENT_DEADLINE_DAYS", 7, ge=1)
    escrow_auto_refund_deadline_days: int = _env("ESCROW_AUTO_REFUND_DEADLINE_DAYS", 7, ge=1)
    escrow_timeout_poll_interval_minutes: int = _env(
        "ESCROW_TIMEOUT_POLL_INTERVAL_MINUTES", 5, ge=1
    )
    escrow_max_retries: int = _env("ESCROW_MAX_RETRIES", 3, ge=0, le=100)
    escrow_retry_delay_ms: int = _env("ESCROW_RETRY_DELAY_MS", 1000, ge=0)
    escrow_delivered_timeout_action: Literal["refund", "release"] = _env(
        "ESCROW_DELIVERED_TIMEOUT_ACTION", "refund"
    )
    #: The USD maximum (cents) of installs that predate the per-currency limits.
    escrow_max_amount_minor: int = _env("ESCROW_MAX_AMOUNT_MINOR", 10_000_000_00, ge=1)
    #: Largest escrow in USD cents (unset: ESCROW_MAX_AMOUNT_MINOR); STRIPE escrows are
    #: further capped at Stripe's 99,999,999-cent maximum charge.
    escrow_max_amount_usd_minor: int | None = _env("ESCROW_MAX_AMOUNT_USD_MINOR", None, ge=1)
    #: Largest escrow in USDC base units (6 decimals): 10,000,000 USDC by default.
    escrow_max_amount_usdc_minor: int = _env(
        "ESCROW_MAX_AMOUNT_USDC_MINOR", 10_000_000_000_000, ge=1
    )
    #: Platform fee withheld from the seller, in basis points, when a create names none.
    escrow_fee_bps: int = _env("ESCROW_FEE_BPS", 0, ge=0, le=10_000)
    escrow_recent_commands_max: int = _env("ESCROW_RECENT_COMMANDS_MAX", 1000, ge=1)
    internal_command_secret: SecretStr = _env(
        "INTERNAL_COMMAND_SECRET", SecretStr(DEV_INTERNAL_COMMAND_SECRET)
    )

    # Payment providers (development values are obviously fake; stripe-mock accepts them)
    # stripe-mock accepts any key that looks like a test key: letters and digits after sk_test_
    stripe_secret_key: SecretStr = _env(
        "STRIPE_SECRET_KEY", SecretStr("sk_test_DevOnlyNotARealKey")
    )
    stripe_webhook_secret: SecretStr = _env(
        "STRIPE_WEBHOOK_SECRET", SecretStr("whsec_dev_not_a_secret")
    )
    stripe_connect_client_id: str | None = _env("STRIPE_CONNECT_CLIENT_ID", None)
    stripe_api_base: str | None = _env("STRIPE_API_BASE", None)
    #: Card funds held longer than this after funding are past the limit (SPEC §10): listed by
    #: ``escrow-stream escrows stuck``; STRIPE_HOLD_WARN_DAYS (< the maximum) warns before.
    stripe_max_hold_days: int = _env("STRIPE_MAX_HOLD_DAYS", 90, ge=1, le=3650)
    stripe_hold_warn_days: int = _env("STRIPE_HOLD_WARN_DAYS", 80, ge=1, le=3650)
    #: Off only where a test plays the payment provider itself by sending system commands.
    payments_effects_enabled: bool = _env("PAYMENTS_EFFECTS_ENABLED", True)
    #: One HTTP call to Stripe, the custodian, TRM or Chainalysis (connect + read).
    provider_timeout_ms: int = _env("PROVIDER_TIMEOUT_MS", 30_000, ge=100, le=300_000)
    custodian_api_key: SecretStr = _env("CUSTODIAN_API_KEY", SecretStr("custodian_dev_not_a_key"))
    custodian_api_url: str = _env("CUSTODIAN_API_URL", "http://127.0.0.1:12200")
    custodian_webhook_secret: SecretStr = _env(
        "CUSTODIAN_WEBHOOK_SECRET", SecretStr("whsec_custodian_dev_not_a_secret")
    )
    custodian_min_confirmations: int = _env("CUSTODIAN_MIN_CONFIRMATIONS", 12, ge=1)

    # Risk screening
    trm_api_key: SecretStr = _env("TRM_API_KEY", SecretStr("trm_dev_not_a_key"))
    trm_api_url: str = _env("TRM_API_URL", "https://api.trmlabs.com")
    chainalysis_api_key: SecretStr = _env("CHAINALYSIS_API_KEY", SecretStr("chain_dev_not_a_key"))
    chainalysis_api_url: str = _env("CHAINALYSIS_API_URL", "https://api.chainalysis.com")

    # Storage
    aws_access_key_id: SecretStr = _env("AWS_ACCESS_KEY_ID", SecretStr("dev-access-key"))
    aws_secret_access_key: SecretStr = _env("AWS_SECRET_ACCESS_KEY", SecretStr("dev-secret-key"))
    aws_s3_bucket: str = _env("AWS_S3_BUCKET", "escrow-stream-dev")
    aws_region: str = _env("AWS_REGION", "us-east-1")
    aws_endpoint_url: str | None = _env("AWS_ENDPOINT_URL", None)

    # Idempotency
    idempotency_storage: Literal["database", "redis"] = _env("IDEMPOTENCY_STORAGE", "database")
    redis_url: SecretStr | None = _env("REDIS_URL", None)
    idempotency_ttl_hours: int = _env("IDEMPOTENCY_TTL_HOURS", 24, ge=1)

    # Monitoring
    sentry_dsn: SecretStr | None = _env("SENTRY_DSN", None)
    sentry_environment: str | None = _env("SENTRY_ENVIRONMENT", None)
    metrics_enabled: bool = _env("METRICS_ENABLED", False)
    metrics_port: int = _env("METRICS_PORT", 9090, ge=1, le=65535)
    #: Liveness fails when an assigned command partition has lag and no progress this long.
    stall_timeout_s: int = _env("STALL_TIMEOUT_S", 60, ge=5, le=3600)
    #: Provider reconciliation inside the worker every this many minutes (0: off).
    reconcile_interval_minutes: int = _env("RECONCILE_INTERVAL_MINUTES", 0, ge=0, le=7 * 24 * 60)

    # Feature flags
    feature_milestone_escrows: bool = _env("FEATURE_MILESTONE_ESCROWS", True)
    feature_auto_refund: bool = _env("FEATURE_AUTO_REFUND", True)
    feature_kyc_gating: bool = _env("FEATURE_KYC_GATING", True)

    @model_validator(mode="before")
    @classmethod
    def _replication_factor_default(cls, data: Any) -> Any:
        """KAFKA_REPLICATION_FACTOR left unset is 3 in production (1 is the field default)."""
        if not isinstance(data, Mapping):
            return data
        if "KAFKA_REPLICATION_FACTOR" in data or "kafka_replication_factor" in data:
            return data
        node_env = data.get("NODE_ENV", data.get("node_env"))
        if str(node_env).strip().lower() == NodeEnv.PRODUCTION:
            return {**data, "KAFKA_REPLICATION_FACTOR": REPLICATION_FACTOR_PRODUCTION_DEFAULT}
        return data

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_networks(value)
        return value

    @field_validator("web_canonical_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} must be an http(s) URL, e.g. http://worker-0.escrow:3000")
        return value.rstrip("/") if value is not None else None

    @field_validator("cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(o.strip() for o in value.split(",") if o.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret_long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < JWT_SECRET_LENGTH_MIN:
            raise ValueError(
                f"JWT_SECRET must be at least {JWT_SECRET_LENGTH_MIN} characters "
                f"(got {len(value.get_secret_value())}); generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(64))'`"
            )
        return value

    @field_validator("stripe_hold_warn_days")
    @classmethod
    def _hold_warning_before_maximum(cls, value: int, info: ValidationInfo) -> int:
        maximum = info.data.get("stripe_max_hold_days")
        if maximum is not None and value >= maximum:
            raise ValueError(f"must be less than STRIPE_MAX_HOLD_DAYS ({maximum}), got {value}")
        return value

    # -- derived values ---------------------------------------------------------------

    @property
    def is_production(self) -> bool:
        return self.node_env is NodeEnv.PRODUCTION

    @property
    def uses_dev_jwt_secret(self) -> bool:
        return self.jwt_secret.get_secret_value() == DEV_JWT_SECRET

    @property
    def canonical_url(self) -> str:
        """This worker's URL for the other workers (WEB_CANONICAL_URL or derived)."""
        if self.web_canonical_url is not None:
            return self.web_canonical_url
        host = self.web_host.strip("[]")
        if host in WILDCARD_HOSTS:
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"http://{host}:{self.port}"

    @property
    def broker_urls(self) -> list[str]:
        return [f"kafka://{b.strip()}" for b in self.kafka_brokers.split(",") if b.strip()]

    @property
    def bootstrap_servers(self) -> list[str]:
        return [b.strip() for b in self.kafka_brokers.split(",") if b.strip()]

    @property
    def migrations_database_url(self) -> str:
        """DATABASE_URL_PRISMA names the schema-owning connection; DATABASE_URL otherwise."""
        url = self.database_url_prisma or self.database_url
        return url.get_secret_value()

    def masked(self, reveal: bool = False) -> dict[str, Any]:
        """The configuration keyed by environment variable name; secrets masked."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            key = field.alias or name.upper()
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                value = raw if reveal else _mask(raw)
            elif isinstance(value, StrEnum):
                value = value.value
            elif isinstance(value, tuple):
                value = ",".join(value)
            out[key] = value
        return out


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) of TRUSTED_PROXIES; raises ValueError naming a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def _mask(raw: str) -> str:
    """Hide a secret; for URLs keep everything but the password."""
    parts = urlsplit(raw)
    if parts.scheme and parts.hostname and "@" in parts.netloc:
        user = parts.username or ""
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        netloc = f"{user}:***@{host}" if parts.password else f"***@{host}"
        return urlunsplit(parts._replace(netloc=netloc))
    return "***" if raw else ""


def _field_aliases() -> set[str]:
    return {f.alias for f in Settings.model_fields.values() if f.alias}


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build the settings from an environment mapping, following the module's steps."""
    node_env = environ.get("NODE_ENV", "").strip().lower()
    if node_env == NodeEnv.PRODUCTION:
        missing = [n for n in REQUIRED_IN_PRODUCTION if not environ.get(n, "").strip()]
        if (
            environ.get("IDEMPOTENCY_STORAGE", "").strip() == "redis"
            and not environ.get("REDIS_URL", "").strip()
        ):
            missing.append("REDIS_URL")
        if missing:
            raise MissingVariables(missing)
    known = _field_aliases()
    values = {k: v for k, v in environ.items() if k in known and v.strip() != ""}
    if "NODE_ENV" in values:
        values["NODE_ENV"] = values["NODE_ENV"].strip().lower()
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if settings.idempotency_storage == "redis" and settings.redis_url is None:
        raise ConfigError("Error: REDIS_URL is required when IDEMPOTENCY_STORAGE=redis")
    if not settings.is_production and settings.stripe_api_base is None:
        # development talks to the stack's stripe-mock, never to api.stripe.com
        settings = settings.model_copy(update={"stripe_api_base": LOCAL_STRIPE_MOCK})
    if not settings.is_production and settings.aws_endpoint_url is None:
        # development stores evidence in the stack's local S3, never in a real bucket
        settings = settings.model_copy(update={"aws_endpoint_url": LOCAL_S3})
    if settings.is_production:
        problems = weak_production_secrets(settings)
        if problems:
            raise ConfigError(
                "Error: Unsafe secrets for NODE_ENV=production:\n"
                + "\n".join(f"  {p}" for p in problems)
                + "\nGenerate our own with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`; "
                "provider keys and webhook secrets come from the provider's dashboard."
            )
    return settings


def weak_production_secrets(settings: Settings) -> list[str]:
    """Each secret the service uses that is shorter than its minimum or still a development
    default, named with the rule it breaks (values are never printed)."""
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    problems: list[str] = []
    for name, length_min in PRODUCTION_SECRET_LENGTH_MIN.items():
        field = Settings.model_fields[name]
        value = getattr(settings, name)
        raw = value.get_secret_value() if isinstance(value, SecretStr) else ""
        default = defaults[name]
        if isinstance(default, SecretStr) and raw == default.get_secret_value():
            problems.append(f"{field.alias} is the development default; set the real secret")
        elif len(raw) < length_min:
            problems.append(f"{field.alias} must be at least {length_min} characters")
    return problems


def _describe(exc: ValidationError) -> str:
    lines = ["Error: Invalid environment configuration:"]
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        lines.append(f"  {name}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def dump_json(settings: Settings, reveal: bool = False) -> str:
    return json.dumps(settings.masked(reveal=reveal), indent=2, sort_keys=True)


def domain_settings(settings: Settings) -> DomainSettings:
    """The domain's rules as this deployment configures them."""
    return DomainSettings(
        payment_deadline_days=settings.escrow_payment_deadline_days,
        auto_refund_deadline_days=settings.escrow_auto_refund_deadline_days,
        delivered_timeout_action=settings.escrow_delivered_timeout_action,
        feature_milestone_escrows=settings.feature_milestone_escrows,
        feature_auto_refund=settings.feature_auto_refund,
        feature_kyc_gating=settings.feature_kyc_gating,
        max_amount_minor={
            Currency.USD: settings.escrow_max_amount_usd_minor or settings.escrow_max_amount_minor,
            Currency.USDC: settings.escrow_max_amount_usdc_minor,
        },
        fee_bps=settings.escrow_fee_bps,
        recent_commands_max=settings.escrow_recent_commands_max,
    )
