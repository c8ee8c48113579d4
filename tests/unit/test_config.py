"""Configuration: the seed's defaults, the production message, secret validation."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from escrow_stream.cli import main
from escrow_stream.config import (
    DEV_INTERNAL_COMMAND_SECRET,
    DEV_JWT_SECRET,
    ConfigError,
    MissingVariables,
    load_settings,
)
from tests.harness import production_env


def test_defaults_with_no_environment_are_the_seeds() -> None:
    s = load_settings({})
    assert s.node_env == "development"
    assert s.port == 3000
    assert s.log_level == "info"
    assert s.database_pool_size == 10
    assert s.database_pool_timeout_ms == 20000
    assert s.kafka_commands_topic == "escrow-commands"
    assert s.kafka_events_topic == "escrow.events.v1"
    assert s.kafka_ssl_enabled is False
    assert s.escrow_payment_deadline_days == 7
    assert s.escrow_auto_refund_deadline_days == 7
    assert s.escrow_timeout_poll_interval_minutes == 5
    assert s.escrow_max_retries == 3
    assert s.escrow_retry_delay_ms == 1000
    assert s.idempotency_storage == "database"
    assert s.idempotency_ttl_hours == 24
    assert s.metrics_enabled is False
    assert s.metrics_port == 9090
    assert s.feature_milestone_escrows is True
    assert s.feature_auto_refund is True
    assert s.feature_kyc_gating is True
    assert s.bootstrap_servers == ["127.0.0.1:9092"]
    assert s.uses_dev_jwt_secret


def test_values_are_parsed_from_the_environment() -> None:
    s = load_settings(
        {
            "PORT": "3100",
            "KAFKA_BROKERS": "k1:9092, k2:9092",
            "CORS_ORIGINS": "https://a.example,https://b.example",
            "FEATURE_AUTO_REFUND": "false",
            "LOG_LEVEL": "DEBUG",
        }
    )
    assert s.port == 3100
    assert s.bootstrap_servers == ["k1:9092", "k2:9092"]
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.feature_auto_refund is False
    assert s.log_level == "debug"


def test_production_names_every_missing_variable_in_the_seeds_words() -> None:
    env = production_env()
    del env["DATABASE_URL"]
    del env["KAFKA_BROKERS"]
    with pytest.raises(MissingVariables) as err:
        load_settings(env)
    assert str(err.value) == (
        "Error: Missing required environment variables: DATABASE_URL, KAFKA_BROKERS\n"
        "Please check your .env file or environment configuration."
    )


def test_production_with_everything_set_starts() -> None:
    s = load_settings(production_env())
    assert s.is_production
    assert not s.uses_dev_jwt_secret


def test_production_needs_redis_url_for_redis_idempotency() -> None:
    with pytest.raises(MissingVariables) as err:
        load_settings(production_env(IDEMPOTENCY_STORAGE="redis"))
    assert err.value.names == ["REDIS_URL"]


def test_short_jwt_secret_fails_with_a_clear_message() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"JWT_SECRET": "x" * 63})
    assert "JWT_SECRET must be at least 64 characters (got 63)" in str(err.value)


def test_invalid_values_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"PORT": "not-a-port", "IDEMPOTENCY_STORAGE": "memcached"})
    text = str(err.value)
    assert "PORT:" in text
    assert "IDEMPOTENCY_STORAGE:" in text


def test_config_show_masks_secrets_unless_revealed() -> None:
    runner = CliRunner()
    env = {"DATABASE_URL": "postgresql://app:hunter2@db:5432/escrow", "JWT_SECRET": "j" * 64}
    masked = json.loads(runner.invoke(main, ["config", "show"], env=env).output)
    assert masked["DATABASE_URL"] == "postgresql://app:***@db:5432/escrow"
    assert masked["JWT_SECRET"] == "***"
    assert masked["KAFKA_EVENTS_TOPIC"] == "escrow.events.v1"
    revealed = json.loads(runner.invoke(main, ["config", "show", "--reveal"], env=env).output)
    assert revealed["DATABASE_URL"] == env["DATABASE_URL"]
    assert revealed["JWT_SECRET"] == env["JWT_SECRET"]


def test_cli_fails_before_anything_else_in_production_without_variables() -> None:
    result = CliRunner().invoke(main, ["config", "show"], env={"NODE_ENV": "production"})
    assert result.exit_code == 1
    assert "Error: Missing required environment variables: PORT, DATABASE_URL" in result.output


def test_dev_secret_is_long_enough_and_never_accepted_in_production() -> None:
    assert len(DEV_JWT_SECRET) >= 64
    with pytest.raises(ConfigError, match="JWT_SECRET is the development default"):
        load_settings(production_env(JWT_SECRET=DEV_JWT_SECRET))


def test_development_talks_to_stripe_mock_and_production_to_stripe() -> None:
    assert load_settings({}).stripe_api_base == "http://127.0.0.1:12111"
    assert load_settings(production_env()).stripe_api_base is None
    assert load_settings({"STRIPE_API_BASE": "http://mock:1"}).stripe_api_base == "http://mock:1"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("INTERNAL_COMMAND_SECRET", DEV_INTERNAL_COMMAND_SECRET, "development default"),
        ("INTERNAL_COMMAND_SECRET", "short-internal", "at least 32 characters"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_dev_not_a_secret", "development default"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_123", "at least 20 characters"),
        ("CUSTODIAN_WEBHOOK_SECRET", "whsec_custodian_dev_not_a_secret", "development default"),
        ("STRIPE_SECRET_KEY", "sk_test_DevOnlyNotARealKey", "development default"),
        ("TRM_API_KEY", "trm_dev_not_a_key", "development default"),
    ],
)
def test_production_refuses_development_or_short_secrets(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(production_env(**{name: value}))
    message = str(err.value)
    assert f"{name} " in message and says in message
    assert value not in message.replace(f"{name} ", "")  # the value itself is never printed


def test_production_names_every_unsafe_secret_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(
            production_env(INTERNAL_COMMAND_SECRET="short", CUSTODIAN_WEBHOOK_SECRET="short")
        )
    assert "INTERNAL_COMMAND_SECRET" in str(err.value)
    assert "CUSTODIAN_WEBHOOK_SECRET" in str(err.value)


def test_replication_factor_defaults_to_three_in_production_and_one_elsewhere() -> None:
    assert load_settings({}).kafka_replication_factor == 1
    assert load_settings({"NODE_ENV": "test"}).kafka_replication_factor == 1
    assert load_settings(production_env()).kafka_replication_factor == 3
    # an empty value counts as unset, as for every other variable
    assert load_settings(production_env(KAFKA_REPLICATION_FACTOR="")).kafka_replication_factor == 3


def test_replication_factor_set_explicitly_wins_in_production() -> None:
    assert load_settings(production_env(KAFKA_REPLICATION_FACTOR="1")).kafka_replication_factor == 1
    assert load_settings({"KAFKA_REPLICATION_FACTOR": "2"}).kafka_replication_factor == 2


def test_faust_changelogs_get_the_production_replication_factor() -> None:
    from escrow_stream.app import faust_app, rate_limiter
    from escrow_stream.clock import utc_now
    from escrow_stream.tables import escrows
    from escrow_stream.topics import topic_specs

    settings = load_settings(production_env())
    app = faust_app(settings, utc_now, rate_limiter(settings, None))
    table = escrows.define(app, 6)
    assert app.conf.topic_replication_factor == 3
    # a changelog topic names no replicas of its own: Faust declares it with the app's factor
    assert table.changelog_topic.replicas is None
    assert {s.replication_factor for s in topic_specs(settings)} == {3}
