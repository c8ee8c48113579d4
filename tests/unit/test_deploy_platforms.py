"""render.yaml, railway.json and deploy/ecs/*.json, statically: parsed, then the same
variables, secrets and commands as the other targets; each check shown failing too."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from escrow_stream.agents.relay import STOP_WAIT_S
from tests.deploy_support import (
    REQUIRED,
    REQUIRED_SECRETS,
    ROOT,
    SECRETS,
    ecs_problems,
    railway_problems,
    render_env,
    render_problems,
    settings_problems,
    unknown_variables,
)

ECS_FILES = sorted((ROOT / "deploy" / "ecs").glob("*.json"))


@pytest.fixture()
def render() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "render.yaml").read_text())
    return doc


@pytest.fixture()
def railway() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((ROOT / "railway.json").read_text())
    return doc


def service(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in doc["services"] if s["name"] == name]
    assert len(found) == 1, name
    return found[0]


# -- Render ----------------------------------------------------------------------------------


def test_render_blueprint(render: dict[str, Any]) -> None:
    assert render_problems(render) == []
    types = sorted((s["type"], s["startCommand"]) for s in render["services"])
    assert types == [
        ("cron", "escrow-stream idempotency purge"),
        ("cron", "escrow-stream reconcile"),
        ("web", "escrow-stream worker"),
        ("worker", "escrow-stream outbox-publisher"),
    ]
    assert render["databases"][0]["postgresMajorVersion"] == "16"


def test_render_secrets_are_never_in_the_file(render: dict[str, Any]) -> None:
    for svc in render["services"]:
        env, _ = render_env(render, svc)
        for var in REQUIRED_SECRETS:
            item = env[var]
            assert item.get("sync") is False or "fromDatabase" in item or item.get("generateValue")


def test_render_check_fails_on_each_rule(render: dict[str, Any]) -> None:
    broken = copy.deepcopy(render)
    group = broken["envVarGroups"][0]["envVars"]
    group[:] = [v for v in group if v["key"] != "TRM_API_KEY"]
    jwt = next(v for v in group if v["key"] == "JWT_SECRET")
    jwt.pop("sync")
    jwt["generateValue"] = True
    next(v for v in group if v["key"] == "STRIPE_SECRET_KEY")["value"] = "sk_live_oops"
    web = service(broken, "escrow-stream-api")
    web["healthCheckPath"] = "/"
    web["disk"]["mountPath"] = "/elsewhere"
    web["preDeployCommand"] = "escrow-stream db migrate && escrow-stream topics make"
    service(broken, "escrow-stream-reconcile")["envVars"][1]["fromDatabase"]["name"] = "gone"
    problems = render_problems(broken)
    for expected in (
        "escrow-stream-api: missing TRM_API_KEY",
        "escrow-stream-api: JWT_SECRET generated (44 chars) is shorter than its minimum 64",
        "escrow-stream-api: secret STRIPE_SECRET_KEY has a value in the file",
        "escrow-stream-api: healthCheckPath is not /health",
        "escrow-stream-api: DATA_DIR /var/data/escrow-stream is not on the service's disk",
        "escrow-stream-api: escrow-stream topics make: no such command",
        "escrow-stream-reconcile: database gone does not exist",
    ):
        assert expected in problems, (expected, problems)


# -- Railway ---------------------------------------------------------------------------------


def test_railway_config(railway: dict[str, Any]) -> None:
    assert railway_problems(railway) == []
    assert railway["deploy"]["startCommand"] == "escrow-stream worker"
    # Railway sends SIGTERM, then SIGKILL after drainingSeconds: the worker's clean leave
    assert railway["deploy"]["drainingSeconds"] > STOP_WAIT_S


def test_railway_check_fails_on_each_rule(railway: dict[str, Any]) -> None:
    broken = copy.deepcopy(railway)
    broken["build"]["dockerfilePath"] = "docker/Missing.Dockerfile"
    broken["deploy"]["startCommand"] = "escrow-stream serve"
    broken["deploy"]["preDeployCommand"] = ["python manage.py migrate"]
    broken["deploy"]["healthcheckPath"] = "/ready"
    assert railway_problems(broken) == [
        "dockerfilePath docker/Missing.Dockerfile does not exist",
        "escrow-stream serve: no such command",
        "'python manage.py migrate' does not run escrow-stream",
        "healthcheckPath is not /health",
    ]


# -- ECS -------------------------------------------------------------------------------------


def test_ecs_task_definitions_exist() -> None:
    names = [p.name for p in ECS_FILES]
    assert "task-definition.json" in names
    assert len(names) >= 2


@pytest.mark.parametrize("path", ECS_FILES, ids=lambda p: p.name)
def test_ecs_task_definition(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert ecs_problems(doc, STOP_WAIT_S) == []
    (container,) = doc["containerDefinitions"]
    names = {e["name"] for e in container["environment"]} | {
        s["name"] for s in container["secrets"]
    }
    assert names >= REQUIRED
    assert not SECRETS & {e["name"] for e in container["environment"]}


def test_ecs_worker_keeps_its_tables_on_a_volume() -> None:
    doc = json.loads((ROOT / "deploy" / "ecs" / "task-definition.json").read_text())
    (container,) = doc["containerDefinitions"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    mounts = {m["containerPath"]: m["sourceVolume"] for m in container["mountPoints"]}
    assert mounts[env["DATA_DIR"]] in {v["name"] for v in doc["volumes"]}
    assert container["command"] == ["worker"]
    assert "/health" in " ".join(container["healthCheck"]["command"])


def test_ecs_check_fails_on_each_rule() -> None:
    doc = json.loads((ROOT / "deploy" / "ecs" / "task-definition.json").read_text())
    broken = copy.deepcopy(doc)
    container = broken["containerDefinitions"][0]
    secret = next(s for s in container["secrets"] if s["name"] == "JWT_SECRET")
    container["secrets"].remove(secret)
    container["environment"].append({"name": "JWT_SECRET", "value": "x" * 64})
    container["secrets"] = [s for s in container["secrets"] if s["name"] != "API_URL"]
    container["environment"] = [e for e in container["environment"] if e["name"] != "API_URL"]
    next(s for s in container["secrets"] if s["name"] == "TRM_API_KEY")["valueFrom"] = "trm-key"
    container["logConfiguration"] = {"logDriver": "json-file"}
    container["healthCheck"]["interval"] = "30"
    container["command"] = ["run"]
    problems = ecs_problems(broken, STOP_WAIT_S)
    assert problems[0].startswith(
        "Invalid type for parameter containerDefinitions[0].healthCheck.interval"
    )
    assert problems[1:] == [
        "worker: missing API_URL",
        "worker: secrets in plain environment: JWT_SECRET",
        "worker: not from Secrets Manager: JWT_SECRET",
        "worker: TRM_API_KEY valueFrom 'trm-key' is no Secrets Manager / SSM ARN",
        "worker: no awslogs configuration",
        "worker: escrow-stream run: no such command",
    ]


# -- the values themselves -------------------------------------------------------------------


def render_values(doc: dict[str, Any], svc: dict[str, Any]) -> dict[str, str | None]:
    """A Render service's env: ``value`` as given; ``sync: false``, ``fromDatabase`` and
    ``generateValue`` are Render's to fill (None)."""
    env, _ = render_env(doc, svc)
    return {k: (str(v["value"]) if "value" in v else None) for k, v in env.items()}


def ecs_values(doc: dict[str, Any]) -> dict[str, str | None]:
    (container,) = doc["containerDefinitions"]
    values: dict[str, str | None] = {e["name"]: e["value"] for e in container["environment"]}
    values.update({s["name"]: None for s in container["secrets"]})
    return values


def test_every_value_given_loads_through_config(render: dict[str, Any]) -> None:
    for svc in render["services"]:
        assert settings_problems(render_values(render, svc)) == [], svc["name"]
    for path in ECS_FILES:
        assert settings_problems(ecs_values(json.loads(path.read_text()))) == [], path.name


def test_values_check_fails_on_a_value_config_refuses(render: dict[str, Any]) -> None:
    broken = copy.deepcopy(render)
    group = broken["envVarGroups"][0]["envVars"]
    next(v for v in group if v["key"] == "KAFKA_REPLICATION_FACTOR")["value"] = "three"
    problems = settings_problems(render_values(broken, broken["services"][0]))
    assert [p.split(":")[0].strip() for p in problems[1:]] == ["KAFKA_REPLICATION_FACTOR"]
    doc = json.loads((ROOT / "deploy" / "ecs" / "task-definition.json").read_text())
    doc["containerDefinitions"][0]["environment"].append({"name": "PORT", "value": "0"})
    assert settings_problems(ecs_values(doc))[1].startswith("  PORT:")


def test_every_variable_is_one_config_reads(render: dict[str, Any]) -> None:
    for svc in render["services"]:
        assert unknown_variables(render_values(render, svc), ["PYTHON_VERSION"]) == []
    for path in ECS_FILES:
        assert unknown_variables(ecs_values(json.loads(path.read_text()))) == [], path.name
    broken = copy.deepcopy(render)
    broken["envVarGroups"][0]["envVars"].append({"key": "SENTRY_ENV", "value": "production"})
    values = render_values(broken, broken["services"][0])
    assert unknown_variables(values, ["PYTHON_VERSION"]) == ["SENTRY_ENV"]
