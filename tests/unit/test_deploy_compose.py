"""docker-compose.yml and docker-compose.prod.yml, statically: the Compose specification's
schema (shipped by check-jsonschema), then our own checks, each shown failing on a broken copy."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from escrow_stream.agents.relay import STOP_WAIT_S
from tests.deploy_support import (
    REQUIRED,
    REQUIRED_SECRETS,
    ROOT,
    cli_problems,
    compose_depends_problems,
    compose_env,
    compose_healthcheck_problems,
    compose_port_problems,
    compose_required_problems,
    compose_schema_errors,
    compose_secret_problems,
    compose_worker_problems,
    escrow_services,
    image_tag_problems,
    kraft_problems,
    settings_problems,
    shell_problems,
    unknown_variables,
)

DEV = "docker-compose.yml"
PROD = "docker-compose.prod.yml"
DEV_WORKERS = ("worker-1", "worker-2")
PROD_WORKERS = ("escrow-service",)


def env_of(doc: dict[str, Any], service: str) -> dict[str, str]:
    return {k: v or "" for k, v in compose_env(doc["services"][service]).items()}


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return doc


@pytest.fixture(scope="module")
def dev() -> dict[str, Any]:
    return load(DEV)


@pytest.fixture(scope="module")
def prod() -> dict[str, Any]:
    return load(PROD)


@pytest.mark.parametrize("name", [DEV, PROD])
def test_compose_files_follow_the_compose_specification(name: str) -> None:
    assert compose_schema_errors(load(name)) == []


def test_the_schema_rejects_what_compose_would_reject(dev: dict[str, Any]) -> None:
    broken = copy.deepcopy(dev)
    broken["services"]["worker-1"]["helthcheck"] = broken["services"]["worker-1"].pop("healthcheck")
    broken["services"]["worker-2"]["depends_on"]["init"]["condition"] = "service_done"
    errors = compose_schema_errors(broken)
    assert any("helthcheck" in e for e in errors), errors
    assert any("service_done" in e for e in errors), errors


def test_dev_stack_has_every_component(dev: dict[str, Any]) -> None:
    services = dev["services"]
    images = {name: str(svc.get("image", "")) for name, svc in services.items()}
    assert images["kafka"].startswith("apache/kafka:")
    assert images["postgres"].startswith("postgres:16")
    assert images["redis"].startswith("redis:")
    assert images["stripe-mock"].startswith("stripe/stripe-mock:")
    assert images["minio"].startswith("minio/minio:")
    assert set(escrow_services(dev)) == {"init", *DEV_WORKERS, "outbox-publisher"}
    # the bucket AWS_S3_BUCKET names is created by the one-shot minio-bucket service
    bucket = env_of(dev, "worker-1")["AWS_S3_BUCKET"]
    assert f"/{bucket}" in " ".join(services["minio-bucket"]["command"])


@pytest.mark.parametrize("name", [DEV, PROD])
def test_kafka_runs_in_kraft_mode(name: str) -> None:
    assert kraft_problems(load(name)) == []


def test_kraft_check_fails_on_zookeeper_and_a_bad_cluster_id(dev: dict[str, Any]) -> None:
    broken = copy.deepcopy(dev)
    broken["services"]["kafka"]["environment"]["CLUSTER_ID"] = "escrow-dev"
    broken["services"]["kafka"]["environment"]["KAFKA_ZOOKEEPER_CONNECT"] = "zookeeper:2181"
    problems = kraft_problems(broken)
    assert any("CLUSTER_ID" in p for p in problems), problems
    assert any("ZooKeeper" in p for p in problems), problems


@pytest.mark.parametrize("name", [DEV, PROD])
def test_every_variable_production_requires_is_set(name: str) -> None:
    doc = load(name)
    assert compose_required_problems(doc, escrow_services(doc)) == []


def test_required_check_fails_on_a_missing_or_optional_variable(prod: dict[str, Any]) -> None:
    broken = copy.deepcopy(prod)
    svc_env = broken["services"]["escrow-service"]["environment"]
    del svc_env["CUSTODIAN_API_URL"]
    svc_env["API_URL"] = "${API_URL:-}"
    problems = compose_required_problems(broken, ["escrow-service"])
    assert problems == ["escrow-service: not set for production: API_URL, CUSTODIAN_API_URL"]


def test_prod_secrets_come_from_the_environment_and_are_required(prod: dict[str, Any]) -> None:
    services = escrow_services(prod)
    assert compose_secret_problems(prod, services) == []
    for name in services:
        env = env_of(prod, name)
        for var in REQUIRED_SECRETS:
            assert env[var].startswith(f"${{{var}:?"), (name, var)
    postgres = env_of(prod, "postgres")
    assert postgres["POSTGRES_PASSWORD"].startswith("${DB_PASSWORD:?")


def test_secret_check_fails_on_a_literal_or_a_default(prod: dict[str, Any]) -> None:
    broken = copy.deepcopy(prod)
    env = broken["services"]["outbox-publisher"]["environment"]
    env["JWT_SECRET"] = "x" * 64
    env["STRIPE_SECRET_KEY"] = "${STRIPE_SECRET_KEY:-sk_live_oops}"
    env["SENTRY_DSN"] = "https://key@sentry.example.com/1"
    assert compose_secret_problems(broken, ["outbox-publisher"]) == [
        "outbox-publisher: JWT_SECRET has a value in the file",
        "outbox-publisher: STRIPE_SECRET_KEY must be ${STRIPE_SECRET_KEY:?…} (required)",
        "outbox-publisher: SENTRY_DSN has a value in the file",
    ]


def test_dev_secrets_are_obviously_fake(dev: dict[str, Any]) -> None:
    env = env_of(dev, "worker-1")
    assert env["NODE_ENV"] == "development"
    assert env["STRIPE_SECRET_KEY"].startswith("sk_test_")
    for var in ("JWT_SECRET", "INTERNAL_COMMAND_SECRET"):
        assert "dev-only" in env[var]
    for var in REQUIRED_SECRETS - {"DATABASE_URL", "DATABASE_URL_PRISMA"}:
        assert any(word in env[var].lower() for word in ("dev", "test")), var


@pytest.mark.parametrize(("name", "workers"), [(DEV, DEV_WORKERS), (PROD, PROD_WORKERS)])
def test_workers_publish_port_and_no_host_port_is_taken_twice(
    name: str, workers: tuple[str, ...]
) -> None:
    assert compose_port_problems(load(name), workers) == []


def test_port_check_fails_on_a_clash_and_an_unpublished_port(dev: dict[str, Any]) -> None:
    broken = copy.deepcopy(dev)
    broken["services"]["worker-2"]["ports"] = ["127.0.0.1:3000:3000"]
    broken["services"]["worker-1"]["environment"]["PORT"] = "8080"
    problems = compose_port_problems(broken, DEV_WORKERS)
    assert "worker-2: host port 3000 is worker-1's" in problems
    assert "worker-1: PORT 8080 is not published (ports: [3000])" in problems


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (DEV, {"worker-1": "/health", "worker-2": "/health", "outbox-publisher": "/metrics"}),
        (PROD, {"escrow-service": "/health", "outbox-publisher": "/metrics"}),
    ],
)
def test_workers_and_publisher_have_health_checks(name: str, expected: dict[str, str]) -> None:
    doc = load(name)
    assert compose_healthcheck_problems(doc, expected) == []
    # the publisher's check asks the port it serves its metrics on
    env = env_of(doc, "outbox-publisher")
    assert env["METRICS_ENABLED"] == "true"
    assert f":{env['METRICS_PORT']}/metrics" in " ".join(
        doc["services"]["outbox-publisher"]["healthcheck"]["test"]
    )


def test_healthcheck_check_fails_without_one(dev: dict[str, Any]) -> None:
    broken = copy.deepcopy(dev)
    del broken["services"]["worker-2"]["healthcheck"]
    broken["services"]["outbox-publisher"]["healthcheck"] = {"disable": True}
    problems = compose_healthcheck_problems(
        broken, {"worker-2": "/health", "outbox-publisher": "/metrics"}
    )
    assert problems == ["worker-2: no health check", "outbox-publisher: no health check"]


@pytest.mark.parametrize("name", [DEV, PROD])
def test_depends_on_conditions_are_satisfiable(name: str) -> None:
    doc = load(name)
    assert compose_depends_problems(doc) == []
    for svc in escrow_services(doc):
        if svc == "init":
            continue
        deps = doc["services"][svc]["depends_on"]
        assert deps["init"] == {"condition": "service_completed_successfully"}, svc
        assert deps["postgres"] == {"condition": "service_healthy"}, svc


def test_depends_check_fails_on_a_healthless_or_restarting_dependency(dev: dict[str, Any]) -> None:
    broken = copy.deepcopy(dev)
    broken["services"]["worker-1"]["depends_on"]["stripe-mock"]["condition"] = "service_healthy"
    broken["services"]["init"]["restart"] = "on-failure"
    problems = compose_depends_problems(broken)
    assert "worker-1: waits for stripe-mock to be healthy, which has no check" in problems
    assert "worker-1: waits for init to complete, which restarts" in problems


@pytest.mark.parametrize(("name", "workers"), [(DEV, DEV_WORKERS), (PROD, PROD_WORKERS)])
def test_each_worker_has_its_own_data_volume_and_canonical_url(
    name: str, workers: tuple[str, ...]
) -> None:
    assert compose_worker_problems(load(name), workers) == []


def test_worker_check_fails_on_a_shared_volume_or_url(dev: dict[str, Any]) -> None:
    broken = copy.deepcopy(dev)
    broken["services"]["worker-2"]["volumes"] = ["worker-1-data:/var/lib/escrow-stream"]
    broken["services"]["worker-2"]["environment"]["WEB_CANONICAL_URL"] = "http://worker-1:3000"
    problems = compose_worker_problems(broken, DEV_WORKERS)
    assert "worker-2: shares volume worker-1-data with worker-1" in problems
    assert "worker-2: WEB_CANONICAL_URL http://worker-1:3000 is also worker-1's" in problems
    broken["services"]["worker-2"]["volumes"] = []
    assert "worker-2: no volume at DATA_DIR /var/lib/escrow-stream" in compose_worker_problems(
        broken, DEV_WORKERS
    )


@pytest.mark.parametrize("name", [DEV, PROD])
def test_commands_are_escrow_stream_commands_and_images_the_package_version(name: str) -> None:
    doc = load(name)
    for svc_name, svc in escrow_services(doc).items():
        assert image_tag_problems(svc["image"]) == [], svc_name
        command = svc["command"]
        if svc.get("entrypoint") == ["/bin/sh", "-c"]:
            assert shell_problems(command[0]) == [], svc_name
        else:
            assert cli_problems(command) == [], svc_name
    init = " ".join(doc["services"]["init"]["command"])
    assert init.index("db migrate") < init.index("topics create")


def test_command_and_image_checks_fail_on_a_wrong_one() -> None:
    assert cli_problems(["workers"]) == ["escrow-stream workers: no such command"]
    assert cli_problems(["db", "migrate", "--steps", "2"]) != []
    assert shell_problems("escrow-stream db migrate && escrow-stream topic create") == [
        "escrow-stream topic: no such command"
    ]
    assert image_tag_problems("escrow-stream:${ESCROW_STREAM_VERSION:-0.0.9}") != []


@pytest.mark.parametrize("name", [DEV, PROD])
def test_workers_get_time_for_a_clean_leave(name: str) -> None:
    doc = load(name)
    for svc_name, svc in escrow_services(doc).items():
        if svc_name == "init":
            continue
        grace = svc.get("stop_grace_period", "10s")
        assert grace.endswith("s") and int(grace[:-1]) > STOP_WAIT_S, svc_name


def test_prod_is_production(prod: dict[str, Any]) -> None:
    for name in escrow_services(prod):
        env = env_of(prod, name)
        assert env["NODE_ENV"] == "production"
        assert set(REQUIRED) <= set(env)
        assert env["KAFKA_REPLICATION_FACTOR"].endswith(":-3}")
    kafkas = [n for n, s in prod["services"].items() if "apache/kafka" in s.get("image", "")]
    assert len(kafkas) >= 3


@pytest.mark.parametrize("name", [DEV, PROD])
def test_every_value_given_loads_through_config(name: str) -> None:
    doc = load(name)
    for svc_name, svc in escrow_services(doc).items():
        assert settings_problems(compose_env(svc)) == [], svc_name


def test_values_check_fails_on_a_value_config_refuses(prod: dict[str, Any]) -> None:
    broken = copy.deepcopy(prod)
    env = broken["services"]["escrow-service"]["environment"]
    env["LOG_FORMAT"] = "xml"
    env["TRUSTED_PROXIES"] = "${TRUSTED_PROXIES:-the-load-balancer}"
    problems = settings_problems(compose_env(broken["services"]["escrow-service"]))
    assert problems[0] == "Error: Invalid environment configuration:"
    assert [p.split(":")[0].strip() for p in problems[1:]] == ["LOG_FORMAT", "TRUSTED_PROXIES"]


@pytest.mark.parametrize("name", [DEV, PROD])
def test_every_variable_is_one_config_reads(name: str) -> None:
    doc = load(name)
    for svc_name, svc in escrow_services(doc).items():
        assert unknown_variables(compose_env(svc)) == [], svc_name
    assert unknown_variables(["KAFKA_BROKER", "PORT"]) == ["KAFKA_BROKER"]
