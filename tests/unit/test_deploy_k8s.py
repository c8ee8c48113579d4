"""k8s/, statically: every object against the Kubernetes JSON schemas (kubernetes-validate,
strict: unknown fields fail), then our own checks, each shown failing on a broken copy."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from escrow_stream.agents.relay import STOP_WAIT_S
from escrow_stream.topics import COMMANDS_PARTITIONS
from tests.deploy_support import (
    K8S_DIR,
    POD_OWNERS,
    REQUIRED,
    SECRETS,
    VERSION,
    Doc,
    containers,
    find,
    k8s_api_problems,
    k8s_docs,
    k8s_env,
    k8s_pod_problems,
    k8s_required_problems,
    k8s_schema_errors,
    k8s_secret_problems,
    k8s_worker_problems,
    load_yaml_docs,
    setting_default,
    settings_problems,
    unknown_variables,
)

#: The oldest Kubernetes these manifests promise to fit (CronJob timeZone is GA in 1.27),
#: and the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
TEMPLATE = K8S_DIR / "secret.template.yaml"
METRICS_PORT = int(setting_default("METRICS_PORT"))


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return k8s_docs()


@pytest.fixture()
def broken(docs: list[Doc]) -> list[Doc]:
    return copy.deepcopy(docs)


def workload(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, (kind, name, found)
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_fits_the_kubernetes_schemas(docs: list[Doc], version: str) -> None:
    assert k8s_schema_errors(docs, version) == []


def test_the_schemas_reject_an_unknown_field_and_a_wrong_type(broken: list[Doc]) -> None:
    sts = workload(broken, "StatefulSet")
    sts["spec"]["replica"] = 3
    sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "3000"
    errors = k8s_schema_errors([sts], K8S_VERSIONS[0])
    assert len(errors) == 1 and "StatefulSet/escrow-worker" in errors[0], errors
    del sts["spec"]["replica"]
    assert "containerPort" in k8s_schema_errors([sts], K8S_VERSIONS[0])[0]


def test_every_kind_the_issue_asks_for_is_there(docs: list[Doc]) -> None:
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == sorted(
        [
            "Namespace",
            "ConfigMap",
            "Secret",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget",
            "Ingress",
            "Deployment",
            "Job",
            "CronJob",
        ]
    )
    args = {
        d["metadata"]["name"]: [c["args"] for c in containers(d)]
        for d in docs
        if d["kind"] in ("Job", "CronJob", "Deployment")
    }
    assert args["escrow-setup"] == [["db", "migrate"], ["topics", "create"]]
    assert args["outbox-publisher"] == [["outbox-publisher"]]
    assert ["reconcile"] in args["escrow-reconcile"]
    assert ["idempotency", "purge"] in args["escrow-idempotency-purge"]


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {TEMPLATE.name}
    assert kustomization["images"] == [{"name": "escrow-stream", "newTag": VERSION}]
    namespaces = {d["metadata"].get("namespace") for d in k8s_docs() if d["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]}


def test_workloads_get_every_variable_production_requires(docs: list[Doc]) -> None:
    assert k8s_required_problems(docs) == []


def test_required_check_fails_on_a_missing_variable_or_reference(broken: list[Doc]) -> None:
    del workload(broken, "ConfigMap")["data"]["WEB_APP_URL"]
    job = workload(broken, "Job")
    job["spec"]["template"]["spec"]["containers"][0]["envFrom"][1]["secretRef"]["name"] = "nope"
    problems = k8s_required_problems(broken)
    assert "topics-create: Secret nope does not exist" in problems
    assert any(
        p.startswith("StatefulSet/escrow-worker/worker: missing WEB_APP_URL") for p in problems
    )
    assert any(
        p.startswith("Job/escrow-setup/topics-create: missing") and "JWT_SECRET" in p
        for p in problems
    )


def test_secret_template_names_every_secret_and_nothing_leaks(docs: list[Doc]) -> None:
    (template,) = load_yaml_docs(TEMPLATE)
    assert template["metadata"]["annotations"]["escrow-stream/template"] == "true"
    assert "TEMPLATE" in TEMPLATE.read_text().splitlines()[0]
    assert k8s_secret_problems(docs, template) == []
    assert set(template["stringData"]) == SECRETS


def test_secret_check_fails_on_a_missing_key_or_a_leak(broken: list[Doc]) -> None:
    template = workload(broken, "Secret")
    del template["stringData"]["TRM_API_KEY"]
    template["stringData"]["JWT_SECRET"] = "x" * 64
    workload(broken, "ConfigMap")["data"]["STRIPE_SECRET_KEY"] = "sk_live_x"
    sts = workload(broken, "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "CUSTODIAN_API_KEY", "value": "k"}
    )
    assert k8s_secret_problems(broken, template) == [
        "Secret template lacks TRM_API_KEY",
        "Secret template: JWT_SECRET is not a REPLACE_ME placeholder",
        "ConfigMap/escrow-stream-config holds secrets ['STRIPE_SECRET_KEY']",
        "worker: CUSTODIAN_API_KEY given as a value",
    ]


def test_worker_statefulset(docs: list[Doc]) -> None:
    assert k8s_worker_problems(docs, COMMANDS_PARTITIONS, STOP_WAIT_S) == []


def test_worker_check_fails_on_each_rule(broken: list[Doc]) -> None:
    sts = workload(broken, "StatefulSet")
    sts["spec"]["replicas"] = COMMANDS_PARTITIONS + 1
    pod = sts["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    worker["readinessProbe"]["httpGet"]["path"] = "/health"
    worker["startupProbe"]["failureThreshold"] = 3
    worker["env"].insert(0, worker["env"].pop(2))  # WEB_CANONICAL_URL before POD_NAME
    worker["volumeMounts"] = [m for m in worker["volumeMounts"] if m["name"] != "data"]
    pod["terminationGracePeriodSeconds"] = 30
    workload(broken, "Service", "escrow-workers")["spec"]["clusterIP"] = "10.0.0.1"
    for pdb in find(broken, "PodDisruptionBudget"):
        pdb["spec"]["selector"]["matchLabels"] = {"app": "other"}
    problems = k8s_worker_problems(broken, COMMANDS_PARTITIONS, STOP_WAIT_S)
    assert problems == [
        f"replicas {COMMANDS_PARTITIONS + 1} > {COMMANDS_PARTITIONS} command partitions",
        "serviceName 'escrow-workers' is no headless Service",
        "POD_NAME is defined after WEB_CANONICAL_URL, which uses it",
        "POD_NAMESPACE is defined after WEB_CANONICAL_URL, which uses it",
        "DATA_DIR /var/lib/escrow-stream is not on a volumeClaimTemplate",
        "readinessProbe path is '/health', not /ready",
        "startupProbe allows less than 5 minutes for recovery",
        "terminationGracePeriodSeconds 30 leaves no time past the relay's 60 s stop wait",
        "no PodDisruptionBudget selects the workers",
    ]


def test_canonical_url_is_the_pods_stable_name(docs: list[Doc]) -> None:
    sts = workload(docs, "StatefulSet")
    env, _ = k8s_env(sts["spec"]["template"]["spec"]["containers"][0], docs)
    assert env["WEB_CANONICAL_URL"] == "http://$(POD_NAME).escrow-workers.$(POD_NAMESPACE).svc:3000"
    assert workload(docs, "Service", "escrow-workers")["spec"]["publishNotReadyAddresses"] is True


def test_api_service_and_ingress(docs: list[Doc]) -> None:
    assert k8s_api_problems(docs) == []


def test_api_check_fails_on_a_wrong_host_or_backend(broken: list[Doc]) -> None:
    ingress = workload(broken, "Ingress")
    ingress["spec"]["rules"][0]["host"] = "api.other.example"
    workload(broken, "Service", "escrow-api")["spec"]["selector"] = {"app": "nothing"}
    problems = k8s_api_problems(broken)
    assert problems == [
        "Ingress host api.other.example is not API_URL's (https://api.example.com)",
        "Service escrow-api does not select the workers",
    ]


def test_pods_are_non_root_scraped_and_run_real_commands(docs: list[Doc]) -> None:
    assert k8s_pod_problems(docs, METRICS_PORT) == []
    configmap = workload(docs, "ConfigMap")
    assert configmap["data"]["METRICS_ENABLED"] == "true"
    assert int(configmap["data"]["METRICS_PORT"]) == METRICS_PORT


def test_pod_check_fails_on_root_a_bad_command_or_no_scrape(broken: list[Doc]) -> None:
    cron = workload(broken, "CronJob", "escrow-reconcile")
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = (
        False
    )
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] = [
        "reconcile",
        "--all",
    ]
    publisher = workload(broken, "Deployment")
    del publisher["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"]
    publisher["spec"]["template"]["spec"]["containers"][0]["image"] = "escrow-stream:0.0.1"
    job = workload(broken, "Job")["spec"]["template"]["spec"]
    del job["securityContext"]["seccompProfile"]
    job["initContainers"][0]["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    problems = k8s_pod_problems(broken, METRICS_PORT)
    assert "Job/escrow-setup: no RuntimeDefault seccomp profile" in problems
    assert "Job/escrow-setup/db-migrate: capabilities not all dropped" in problems
    assert "CronJob/escrow-reconcile: not runAsNonRoot with a non-zero runAsUser" in problems
    assert any(
        p.startswith("CronJob/escrow-reconcile: escrow-stream reconcile --all:") for p in problems
    )
    assert "Deployment/outbox-publisher: not scraped on METRICS_PORT 9090" in problems
    assert any("0.0.1" in p for p in problems)


def test_publisher_has_time_to_finish_its_batch(docs: list[Doc]) -> None:
    pod: dict[str, Any] = workload(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > STOP_WAIT_S
    assert pod["containers"][0]["livenessProbe"]["httpGet"] == {
        "path": "/metrics",
        "port": "metrics",
    }


def test_configmap_is_production(docs: list[Doc]) -> None:
    data = workload(docs, "ConfigMap")["data"]
    assert data["NODE_ENV"] == "production"
    assert int(data["KAFKA_REPLICATION_FACTOR"]) >= 3
    assert set(data) >= REQUIRED - SECRETS


def pod_substitutions(doc: Doc) -> dict[str, str]:
    """What the kubelet puts for the downward API's variables in a pod of ``doc``."""
    return {
        "$(POD_NAME)": f"{doc['metadata']['name']}-0",
        "$(POD_NAMESPACE)": doc["metadata"]["namespace"],
    }


def test_every_value_given_loads_through_config(docs: list[Doc]) -> None:
    checked = 0
    for doc in docs:
        if doc["kind"] not in POD_OWNERS:
            continue
        for container in containers(doc):
            env, _ = k8s_env(container, docs)
            assert settings_problems(env, pod_substitutions(doc)) == [], container["name"]
            checked += 1
    assert checked == 7


def test_values_check_fails_on_a_value_config_refuses(broken: list[Doc]) -> None:
    workload(broken, "ConfigMap")["data"]["TRUSTED_PROXIES"] = "the-ingress"
    sts = workload(broken, "StatefulSet")
    worker = sts["spec"]["template"]["spec"]["containers"][0]
    next(e for e in worker["env"] if e["name"] == "WEB_CANONICAL_URL")["value"] = "$(POD_NAME):3000"
    env, _ = k8s_env(worker, broken)
    problems = settings_problems(env, pod_substitutions(sts))
    assert [p.split(":")[0].strip() for p in problems[1:]] == [
        "WEB_CANONICAL_URL",
        "TRUSTED_PROXIES",
    ]


def test_every_variable_is_one_config_reads(docs: list[Doc]) -> None:
    downward = ("POD_NAME", "POD_NAMESPACE")
    for doc in docs:
        if doc["kind"] in POD_OWNERS:
            for container in containers(doc):
                env, _ = k8s_env(container, docs)
                assert unknown_variables(env, downward) == [], container["name"]
    broken = copy.deepcopy(docs)
    workload(broken, "ConfigMap")["data"]["METRICS_ENABLE"] = "true"
    env, _ = k8s_env(containers(workload(broken, "Deployment"))[0], broken)
    assert unknown_variables(env, downward) == ["METRICS_ENABLE"]
