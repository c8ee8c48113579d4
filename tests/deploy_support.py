"""Static checks of the deployment files: Compose, Kubernetes, Render, Railway, ECS.

The variables come from ``escrow_stream/config.py`` (``REQUIRED_IN_PRODUCTION``, and every
``SecretStr`` field as a secret), the commands from the ``escrow-stream`` click group, the
partitions from ``escrow_stream/topics.py``: nothing is copied.  Each ``*_problems`` function
returns what is wrong (empty: nothing), so a test can also show it failing on a broken copy.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
import typing
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import jsonschema
import yaml
from pydantic import SecretStr

from escrow_stream.cli import main as cli_main
from escrow_stream.config import PRODUCTION_SECRET_LENGTH_MIN, REQUIRED_IN_PRODUCTION, Settings

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = "escrow-stream"
VERSION = metadata.version("escrow-stream")

Doc = dict[str, Any]


# -- what the application needs -----------------------------------------------------------


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def secret_variables() -> frozenset[str]:
    """Every variable the service reads as a secret (a ``SecretStr`` field of Settings)."""
    return frozenset(
        str(f.alias) for f in Settings.model_fields.values() if f.alias and _is_secret(f.annotation)
    )


REQUIRED = frozenset(REQUIRED_IN_PRODUCTION)
SECRETS = secret_variables()
REQUIRED_SECRETS = REQUIRED & SECRETS


#: Every variable config.py reads.
KNOWN = frozenset(str(f.alias) for f in Settings.model_fields.values() if f.alias)


def unknown_variables(names: Iterable[str], platform: Iterable[str] = ()) -> list[str]:
    """Names config.py does not read (a typo is a variable silently left at its default),
    besides ``platform``'s own (the downward API's POD_NAME, Render's PYTHON_VERSION)."""
    return sorted(set(names) - KNOWN - set(platform))


def setting_default(variable: str) -> Any:
    for field in Settings.model_fields.values():
        if field.alias == variable:
            return field.default
    raise KeyError(variable)


def secret_length_min(variable: str) -> int:
    """The production minimum length config.py demands of ``variable`` (0: none)."""
    for name, length in PRODUCTION_SECRET_LENGTH_MIN.items():
        if Settings.model_fields[name].alias == variable:
            return length
    return 0


# -- commands -------------------------------------------------------------------------------


def cli_problems(argv: Sequence[str]) -> list[str]:
    """``argv`` (after the program name) must name an escrow-stream command and parse."""
    args = list(argv)
    command: click.Command = cli_main
    path = [PROGRAM]
    while isinstance(command, click.Group):
        if not args:
            return [f"{' '.join(path)}: no subcommand"]
        name = args.pop(0)
        sub = command.get_command(click.Context(command), name)
        if sub is None:
            return [f"{' '.join(path)} {name}: no such command"]
        command = sub
        path.append(name)
    shown = " ".join(path + args)
    try:
        command.make_context(" ".join(path), args)
    except click.ClickException as exc:
        return [f"{shown}: {exc.format_message()}"]
    return []


def shell_problems(line: str) -> list[str]:
    """A shell line of ``escrow-stream …`` commands joined by ``&&`` (possibly inside
    ``sh -c '…'``), each checked."""
    argv = shlex.split(line)
    if argv[:2] in (["/bin/sh", "-c"], ["sh", "-c"]):
        return shell_problems(" ".join(argv[2:]))
    commands: list[list[str]] = [[]]
    for word in argv:
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    problems: list[str] = []
    for command in commands:
        if not command or command[0] != PROGRAM:
            problems.append(f"{' '.join(command)!r} does not run {PROGRAM}")
            continue
        problems += cli_problems(command[1:])
    return problems


def image_tag_problems(image: str) -> list[str]:
    """An escrow-stream image must carry this package's version (interpolation defaults
    resolved: ``escrow-stream:${ESCROW_STREAM_VERSION:-0.1.0}``)."""
    resolved = resolve_default(image)
    name, _, tag = resolved.rpartition(":")
    if not name.endswith(PROGRAM):
        return []
    if tag != VERSION:
        return [f"image {image!r}: tag {tag!r} is not the package version {VERSION}"]
    return []


# -- Compose --------------------------------------------------------------------------------

INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def resolve_default(value: str) -> str:
    """``${X:-d}`` → ``d``; ``${X}`` and ``${X:?…}`` → empty (known only at deploy time)."""

    def one(m: re.Match[str]) -> str:
        return m["arg"] if m["op"] in (":-", "-") else ""

    return INTERPOLATION.sub(one, value)


def compose_value_guaranteed(value: str | None) -> bool:
    """Is the variable sure to be non-empty: a literal, ``${X:?…}``, or a non-empty default."""
    if value is None:
        return False
    text = str(value)
    if not INTERPOLATION.search(text):
        return text.strip() != ""
    for m in INTERPOLATION.finditer(text):
        if m["op"] in (":?", "?") or (m["op"] in (":-", "-") and m["arg"]):
            continue
        return False
    return True


def compose_env(service: Mapping[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs: dict[str, str | None] = {}
        for item in env:
            key, sep, value = str(item).partition("=")
            pairs[key] = value if sep else None
        return pairs
    return {str(k): None if v is None else str(v) for k, v in env.items()}


COMPOSE_SCHEMA = "check_jsonschema/builtin_schemas/vendor/compose-spec.json"


def compose_schema_errors(doc: Doc) -> list[str]:
    """The Compose specification's JSON Schema, as check-jsonschema ships it."""
    # The file only: importing check_jsonschema would load its CLI, which needs a newer click.
    schema_path = metadata.distribution("check-jsonschema").locate_file(COMPOSE_SCHEMA)
    schema = json.loads(Path(str(schema_path)).read_text())
    # by the draft its $schema names (some copies omit the trailing "#" jsonschema keys on)
    drafts = {"draft-07": jsonschema.Draft7Validator, "2020-12": jsonschema.Draft202012Validator}
    validator_class = next(
        (cls for draft, cls in drafts.items() if draft in schema.get("$schema", "")),
        jsonschema.Draft202012Validator,
    )
    validator = validator_class(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def escrow_services(doc: Doc) -> dict[str, Doc]:
    """The services that run our image."""
    return {
        name: svc
        for name, svc in doc.get("services", {}).items()
        if PROGRAM in resolve_default(str(svc.get("image", "")))
    }


def compose_required_problems(doc: Doc, services: Iterable[str]) -> list[str]:
    problems = []
    for name in services:
        env = compose_env(doc["services"][name])
        missing = sorted(v for v in REQUIRED if not compose_value_guaranteed(env.get(v)))
        if missing:
            problems.append(f"{name}: not set for production: {', '.join(missing)}")
    return problems


def compose_secret_problems(doc: Doc, services: Iterable[str]) -> list[str]:
    """Secrets only from the deployment's environment: required ones ``${X:?…}``, optional
    ones at most an empty default; never a value in the file."""
    problems = []
    for name in services:
        for var, value in compose_env(doc["services"][name]).items():
            if var not in SECRETS or value is None:
                continue
            matches = list(INTERPOLATION.finditer(value))
            if not matches:
                problems.append(f"{name}: {var} has a value in the file")
            elif var in REQUIRED and not all(m["op"] in (":?", "?") for m in matches):
                problems.append(f"{name}: {var} must be ${{{var}:?…}} (required)")
            elif any(m["op"] in (":-", "-") and m["arg"] for m in matches):
                problems.append(f"{name}: {var} has a default value in the file")
    return problems


def _port_mapping(entry: Any) -> tuple[str | None, int | None, int]:
    """(host ip, host port, container port) of a short or long port entry."""
    if isinstance(entry, dict):
        published = entry.get("published")
        return entry.get("host_ip"), int(published) if published else None, int(entry["target"])
    parts = str(entry).split("/")[0].rsplit(":", 2)
    if len(parts) == 3:
        return parts[0], int(parts[1]), int(parts[2])
    if len(parts) == 2:
        return None, int(parts[0]), int(parts[1])
    return None, None, int(parts[0])


def compose_port_problems(doc: Doc, services: Iterable[str]) -> list[str]:
    """Each service publishes its PORT; no two services take the same host port."""
    problems = []
    taken: dict[tuple[str | None, int], str] = {}
    for name, svc in doc["services"].items():
        for entry in svc.get("ports", []):
            host_ip, host_port, _ = _port_mapping(entry)
            if host_port is None:
                continue
            if (host_ip, host_port) in taken:
                problems.append(f"{name}: host port {host_port} is {taken[(host_ip, host_port)]}'s")
            taken[(host_ip, host_port)] = name
    for name in services:
        svc = doc["services"][name]
        port = int(resolve_default(compose_env(svc).get("PORT") or "0") or 0)
        targets = {_port_mapping(e)[2] for e in svc.get("ports", [])}
        if port not in targets:
            problems.append(f"{name}: PORT {port} is not published (ports: {sorted(targets)})")
    return problems


def compose_healthcheck_problems(doc: Doc, expected: Mapping[str, str]) -> list[str]:
    """``expected``: service → the URL path its health check must ask."""
    problems = []
    for name, path in expected.items():
        check = doc["services"][name].get("healthcheck")
        if not check or check.get("disable"):
            problems.append(f"{name}: no health check")
            continue
        test = check.get("test")
        text = " ".join(test) if isinstance(test, list) else str(test)
        if path not in text:
            problems.append(f"{name}: health check does not ask {path}: {text}")
    return problems


def compose_depends_problems(doc: Doc) -> list[str]:
    """``service_healthy`` only on services with a health check; a one-shot dependency
    (``service_completed_successfully``) must not restart."""
    problems = []
    services = doc["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown {dep}")
                continue
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy" and not services[dep].get("healthcheck"):
                problems.append(f"{name}: waits for {dep} to be healthy, which has no check")
            if condition == "service_completed_successfully" and services[dep].get(
                "restart", "no"
            ) not in ("no", None):
                problems.append(f"{name}: waits for {dep} to complete, which restarts")
    return problems


def compose_worker_problems(doc: Doc, workers: Sequence[str]) -> list[str]:
    """Each worker: its own volume at DATA_DIR, its own WEB_CANONICAL_URL naming itself."""
    problems = []
    volumes_seen: dict[str, str] = {}
    urls_seen: dict[str, str] = {}
    declared = set((doc.get("volumes") or {}).keys())
    for name in workers:
        svc = doc["services"][name]
        env = compose_env(svc)
        data_dir = env.get("DATA_DIR") or str(setting_default("DATA_DIR"))
        source = None
        for vol in svc.get("volumes", []):
            src, _, target = (
                (vol.get("source"), None, vol.get("target"))
                if isinstance(vol, dict)
                else str(vol).partition(":")
            )
            if str(target).split(":")[0] == data_dir:
                source = src
        if source is None:
            problems.append(f"{name}: no volume at DATA_DIR {data_dir}")
        else:
            if source in volumes_seen:
                problems.append(f"{name}: shares volume {source} with {volumes_seen[source]}")
            if source not in declared:
                problems.append(f"{name}: volume {source} is not declared")
            volumes_seen[str(source)] = name
        url = env.get("WEB_CANONICAL_URL")
        port = resolve_default(env.get("PORT") or str(setting_default("PORT")))
        if not url:
            problems.append(f"{name}: no WEB_CANONICAL_URL")
            continue
        if url in urls_seen:
            problems.append(f"{name}: WEB_CANONICAL_URL {url} is also {urls_seen[url]}'s")
        urls_seen[url] = name
        parts = urlsplit(url)
        host_names = {name, svc.get("hostname"), svc.get("container_name")}
        if parts.hostname not in host_names or str(parts.port) != port:
            problems.append(f"{name}: WEB_CANONICAL_URL {url} is not http://{name}:{port}")
    return problems


def kraft_problems(doc: Doc) -> list[str]:
    """Kafka services: KRaft (no ZooKeeper), a valid CLUSTER_ID, voters that exist."""
    problems = []
    services = doc["services"]
    kafkas = {n: s for n, s in services.items() if "kafka" in str(s.get("image", ""))}
    if not kafkas:
        return ["no Kafka service"]
    for name, svc in kafkas.items():
        env = compose_env(svc)
        if any("ZOOKEEPER" in k for k in env) or "zookeeper" in services:
            problems.append(f"{name}: ZooKeeper configured")
        if "controller" not in (env.get("KAFKA_PROCESS_ROLES") or ""):
            problems.append(f"{name}: no KRaft controller role")
        cluster_id = resolve_default(env.get("CLUSTER_ID") or "")
        try:
            if len(base64.urlsafe_b64decode(cluster_id + "==")) != 16:
                raise ValueError
        except (ValueError, binascii.Error):
            problems.append(f"{name}: CLUSTER_ID {cluster_id!r} is not a base64 UUID")
        for voter in (env.get("KAFKA_CONTROLLER_QUORUM_VOTERS") or "").split(","):
            host = voter.partition("@")[2].rpartition(":")[0]
            if host not in services:
                problems.append(f"{name}: voter {voter} is no service")
    return problems


# -- Kubernetes -----------------------------------------------------------------------------

K8S_DIR = ROOT / "k8s"
POD_OWNERS = ("StatefulSet", "Deployment", "Job", "CronJob")


def load_yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs(directory: Path = K8S_DIR) -> list[Doc]:
    """Every object of every manifest (the Secret template included), not the Kustomization."""
    docs: list[Doc] = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [d for d in load_yaml_docs(path) if d.get("kind") != "Kustomization"]
    return docs


def k8s_schema_errors(docs: Iterable[Doc], version: str) -> list[str]:
    import kubernetes_validate

    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.absolute_path))
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(exc.message)
    return errors


def find(docs: Iterable[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def pod_template(doc: Doc) -> Doc:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]  # type: ignore[no-any-return]


def containers(doc: Doc) -> list[Doc]:
    spec = pod_template(doc)["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def k8s_env(container: Doc, docs: Sequence[Doc]) -> tuple[dict[str, str], list[str]]:
    """The variables a container gets (envFrom ConfigMaps and Secrets, then env), and the
    references that resolve to nothing."""
    env: dict[str, str] = {}
    problems = []
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in source:
                continue
            name = source[key]["name"]
            found = find(docs, kind, name)
            if not found:
                problems.append(f"{container['name']}: {kind} {name} does not exist")
                continue
            obj = found[0]
            env.update({k: str(v) for k, v in (obj.get("data") or {}).items()})
            env.update({k: str(v) for k, v in (obj.get("stringData") or {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "valueFrom" in item:
            env[item["name"]] = "(from " + next(iter(item["valueFrom"])) + ")"
    return env, problems


def k8s_required_problems(docs: Sequence[Doc]) -> list[str]:
    """Every container of every workload gets every production-required variable, non-empty
    (a Secret template's placeholder counts: it is replaced, never emptied)."""
    problems = []
    for doc in docs:
        if doc["kind"] not in POD_OWNERS:
            continue
        for container in containers(doc):
            env, unresolved = k8s_env(container, docs)
            problems += unresolved
            missing = sorted(v for v in REQUIRED if not env.get(v, "").strip())
            if missing:
                problems.append(
                    f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}: "
                    f"missing {', '.join(missing)}"
                )
    return problems


def k8s_secret_problems(docs: Sequence[Doc], template: Doc) -> list[str]:
    """The template names every secret; no secret sits in a ConfigMap or a plain env value."""
    problems = []
    keys = set(template.get("stringData") or {}) | set(template.get("data") or {})
    missing = sorted(SECRETS - keys)
    if missing:
        problems.append(f"Secret template lacks {', '.join(missing)}")
    for var in sorted(REQUIRED_SECRETS & keys):
        if "REPLACE_ME" not in str((template.get("stringData") or {}).get(var, "")):
            problems.append(f"Secret template: {var} is not a REPLACE_ME placeholder")
    for cm in find(docs, "ConfigMap"):
        leaked = sorted(SECRETS & set(cm.get("data") or {}))
        if leaked:
            problems.append(f"ConfigMap/{cm['metadata']['name']} holds secrets {leaked}")
    for doc in docs:
        if doc["kind"] in POD_OWNERS:
            for container in containers(doc):
                for item in container.get("env", []):
                    if item["name"] in SECRETS and "value" in item:
                        problems.append(f"{container['name']}: {item['name']} given as a value")
    return problems


def _probe_path(container: Doc, probe: str) -> str | None:
    spec = container.get(probe)
    return spec["httpGet"]["path"] if spec and "httpGet" in spec else None


def _container_port(container: Doc, port: int | str) -> int | None:
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    return None


def k8s_worker_problems(docs: Sequence[Doc], partitions: int, stop_wait_s: float) -> list[str]:
    """The StatefulSet of workers: replicas, headless Service, canonical URL, DATA_DIR volume,
    probes, grace period, disruption budget, API Service and Ingress."""
    problems = []
    sets = find(docs, "StatefulSet")
    if len(sets) != 1:
        return [f"expected one StatefulSet, found {len(sets)}"]
    sts = sets[0]
    spec = sts["spec"]
    labels = spec["selector"]["matchLabels"]
    if spec.get("replicas", 1) > partitions:
        problems.append(f"replicas {spec['replicas']} > {partitions} command partitions")
    headless = find(docs, "Service", spec.get("serviceName"))
    if not headless or headless[0]["spec"].get("clusterIP") != "None":
        problems.append(f"serviceName {spec.get('serviceName')!r} is no headless Service")
    elif headless[0]["spec"].get("selector") != labels:
        problems.append("the headless Service does not select the workers")
    pod = pod_template(sts)["spec"]
    worker = pod["containers"][0]
    env, _ = k8s_env(worker, docs)
    port = int(env.get("PORT", setting_default("PORT")))
    names = [e["name"] for e in worker.get("env", [])]
    url = env.get("WEB_CANONICAL_URL", "")
    expected = f"http://$(POD_NAME).{spec.get('serviceName')}.$(POD_NAMESPACE).svc:{port}"
    if url != expected:
        problems.append(f"WEB_CANONICAL_URL {url!r} is not {expected!r}")
    for var, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        item = next((e for e in worker.get("env", []) if e["name"] == var), None)
        if item is None or item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != field:
            problems.append(f"{var} is not the downward API's {field}")
        elif "WEB_CANONICAL_URL" in names and names.index(var) > names.index("WEB_CANONICAL_URL"):
            problems.append(f"{var} is defined after WEB_CANONICAL_URL, which uses it")
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    data_dir = env.get("DATA_DIR", str(setting_default("DATA_DIR")))
    mounts = {m["mountPath"]: m["name"] for m in worker.get("volumeMounts", [])}
    if mounts.get(data_dir) not in claims:
        problems.append(f"DATA_DIR {data_dir} is not on a volumeClaimTemplate")
    for probe, path in (
        ("livenessProbe", "/health"),
        ("readinessProbe", "/ready"),
        ("startupProbe", "/health"),
    ):
        if _probe_path(worker, probe) != path:
            problems.append(f"{probe} path is {_probe_path(worker, probe)!r}, not {path}")
        elif _container_port(worker, worker[probe]["httpGet"]["port"]) != port:
            problems.append(f"{probe} does not ask PORT {port}")
    startup = worker.get("startupProbe") or {}
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 300:
        problems.append("startupProbe allows less than 5 minutes for recovery")
    if not worker.get("resources", {}).get("requests"):
        problems.append("worker has no resource requests")
    if pod.get("terminationGracePeriodSeconds", 30) <= stop_wait_s:
        problems.append(
            f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} "
            f"leaves no time past the relay's {stop_wait_s:.0f} s stop wait"
        )
    if not any(
        p["spec"]["selector"].get("matchLabels") == labels
        for p in find(docs, "PodDisruptionBudget")
    ):
        problems.append("no PodDisruptionBudget selects the workers")
    return problems


def k8s_api_problems(docs: Sequence[Doc]) -> list[str]:
    """The API Service selects the workers; the Ingress routes API_URL's host to it."""
    problems = []
    labels = find(docs, "StatefulSet")[0]["spec"]["selector"]["matchLabels"]
    configured = [
        cm["data"]["API_URL"] for cm in find(docs, "ConfigMap") if "API_URL" in cm["data"]
    ]
    api_url = configured[0] if configured else ""
    ingresses = find(docs, "Ingress")
    if not ingresses:
        return ["no Ingress"]
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            if rule.get("host") != urlsplit(api_url).hostname:
                problems.append(f"Ingress host {rule.get('host')} is not API_URL's ({api_url})")
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                services = find(docs, "Service", backend["name"])
                if not services:
                    problems.append(f"Ingress backend {backend['name']} does not exist")
                    continue
                svc = services[0]
                if svc["spec"].get("selector") != labels:
                    problems.append(f"Service {backend['name']} does not select the workers")
                port_names = {p.get("name") for p in svc["spec"]["ports"]} | {
                    p["port"] for p in svc["spec"]["ports"]
                }
                if (backend["port"].get("name") or backend["port"].get("number")) not in port_names:
                    problems.append(f"Ingress asks a port Service {backend['name']} lacks")
    return problems


def k8s_pod_problems(docs: Sequence[Doc], metrics_port: int) -> list[str]:
    """Every workload: non-root, no privilege escalation, image version, valid CLI args;
    long-running ones are scraped on METRICS_PORT."""
    problems = []
    for doc in docs:
        if doc["kind"] not in POD_OWNERS:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        template = pod_template(doc)
        security = template["spec"].get("securityContext") or {}
        if security.get("runAsNonRoot") is not True or not security.get("runAsUser"):
            problems.append(f"{where}: not runAsNonRoot with a non-zero runAsUser")
        if (security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        for container in containers(doc):
            # what the namespace's Pod Security "restricted" level demands of each container
            security = container.get("securityContext") or {}
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}/{container['name']}: privilege escalation allowed")
            if (security.get("capabilities") or {}).get("drop") != ["ALL"]:
                problems.append(f"{where}/{container['name']}: capabilities not all dropped")
            problems += [f"{where}: {p}" for p in image_tag_problems(container["image"])]
            if "command" in container:
                problems.append(f"{where}/{container['name']}: command replaces the entrypoint")
            problems += [f"{where}: {p}" for p in cli_problems(container.get("args", []))]
        if doc["kind"] in ("StatefulSet", "Deployment"):
            notes = template["metadata"].get("annotations") or {}
            scraped = notes.get("prometheus.io/scrape") == "true"
            if not scraped or notes.get("prometheus.io/port") != str(metrics_port):
                problems.append(f"{where}: not scraped on METRICS_PORT {metrics_port}")
            elif not any(_container_port(c, metrics_port) for c in template["spec"]["containers"]):
                problems.append(f"{where}: METRICS_PORT {metrics_port} is not a container port")
    return problems


# -- Render, Railway, ECS -------------------------------------------------------------------

#: Render's ``generateValue``: a random 256-bit value, base64: 44 characters.
RENDER_GENERATED_CHARS = 44


def render_env(doc: Doc, service: Doc) -> tuple[dict[str, Doc], list[str]]:
    groups = {g["name"]: g for g in doc.get("envVarGroups", [])}
    databases = {d["name"] for d in doc.get("databases", [])}
    env: dict[str, Doc] = {}
    problems = []
    for item in service.get("envVars", []):
        if "fromGroup" in item:
            if item["fromGroup"] not in groups:
                problems.append(f"{service['name']}: env group {item['fromGroup']} does not exist")
                continue
            env.update({v["key"]: v for v in groups[item["fromGroup"]]["envVars"]})
        else:
            if "fromDatabase" in item and item["fromDatabase"]["name"] not in databases:
                problems.append(
                    f"{service['name']}: database {item['fromDatabase']['name']} does not exist"
                )
            env[item["key"]] = item
    return env, problems


def render_problems(doc: Doc) -> list[str]:
    problems = []
    for service in doc.get("services", []):
        name = service["name"]
        env, unresolved = render_env(doc, service)
        problems += unresolved
        missing = sorted(
            v
            for v in REQUIRED
            if v not in env or ("value" in env[v] and not str(env[v]["value"]).strip())
        )
        if missing:
            problems.append(f"{name}: missing {', '.join(missing)}")
        for var, item in env.items():
            if var in SECRETS and "value" in item:
                problems.append(f"{name}: secret {var} has a value in the file")
            if item.get("generateValue") and secret_length_min(var) > RENDER_GENERATED_CHARS:
                problems.append(
                    f"{name}: {var} generated ({RENDER_GENERATED_CHARS} chars) is shorter than "
                    f"its minimum {secret_length_min(var)}"
                )
        for key in ("startCommand", "preDeployCommand"):
            if key in service:
                problems += [f"{name}: {p}" for p in shell_problems(service[key])]
        if service["type"] == "web" and service.get("healthCheckPath") != "/health":
            problems.append(f"{name}: healthCheckPath is not /health")
        if service["type"] == "web" and "worker" in service.get("startCommand", ""):
            disk = service.get("disk") or {}
            data_dir = env.get("DATA_DIR", {}).get("value")
            if not disk or disk.get("mountPath") != data_dir:
                problems.append(f"{name}: DATA_DIR {data_dir} is not on the service's disk")
    return problems


def railway_problems(doc: Doc) -> list[str]:
    problems = []
    build, deploy = doc.get("build", {}), doc.get("deploy", {})
    if (
        build.get("builder") == "DOCKERFILE"
        and not (ROOT / build.get("dockerfilePath", "Dockerfile")).is_file()
    ):
        problems.append(f"dockerfilePath {build.get('dockerfilePath')} does not exist")
    if build.get("builder") != "DOCKERFILE" and not build.get("buildCommand"):
        problems.append("no build command")
    if not deploy.get("startCommand"):
        problems.append("no start command")
    else:
        problems += shell_problems(deploy["startCommand"])
    for line in deploy.get("preDeployCommand", []):
        problems += shell_problems(line)
    if deploy.get("healthcheckPath") != "/health":
        problems.append("healthcheckPath is not /health")
    return problems


SECRET_ARN = re.compile(r"^arn:aws:(secretsmanager|ssm):[^:]+:[^:]+:(secret:|parameter/).+")


def ecs_problems(doc: Doc, stop_wait_s: float) -> list[str]:
    import botocore.session
    from botocore.validate import ParamValidator

    shape = (
        botocore.session.get_session()
        .get_service_model("ecs")
        .operation_model("RegisterTaskDefinition")
        .input_shape
    )
    report = ParamValidator().validate(doc, shape)
    problems = [report.generate_report()] if report.has_errors() else []
    for c in doc.get("containerDefinitions", []):
        name = c.get("name")
        plain = {e["name"] for e in c.get("environment", [])}
        secret = {s["name"]: s.get("valueFrom", "") for s in c.get("secrets", [])}
        missing = sorted(REQUIRED - plain - set(secret))
        if missing:
            problems.append(f"{name}: missing {', '.join(missing)}")
        leaked = sorted(SECRETS & plain)
        if leaked:
            problems.append(f"{name}: secrets in plain environment: {', '.join(leaked)}")
        unsecured = sorted(REQUIRED_SECRETS - set(secret))
        if unsecured:
            problems.append(f"{name}: not from Secrets Manager: {', '.join(unsecured)}")
        problems += [
            f"{name}: {var} valueFrom {arn!r} is no Secrets Manager / SSM ARN"
            for var, arn in secret.items()
            if not SECRET_ARN.match(arn)
        ]
        logs = c.get("logConfiguration") or {}
        options = logs.get("options") or {}
        if logs.get("logDriver") != "awslogs" or not {
            "awslogs-group",
            "awslogs-region",
            "awslogs-stream-prefix",
        } <= set(options):
            problems.append(f"{name}: no awslogs configuration")
        health = " ".join((c.get("healthCheck") or {}).get("command", []))
        if "/health" not in health and "/metrics" not in health:
            problems.append(f"{name}: no health check")
        problems += [f"{name}: {p}" for p in cli_problems(c.get("command", []))]
        problems += [f"{name}: {p}" for p in image_tag_problems(c.get("image", ""))]
        if c.get("stopTimeout", 30) <= stop_wait_s:
            problems.append(
                f"{name}: stopTimeout leaves no time past the {stop_wait_s:.0f} s stop wait"
            )
    return problems


# -- the values themselves --------------------------------------------------------------------

#: What a file leaves to the deployment: a placeholder or a required interpolation.
PLACEHOLDER = re.compile(r"REPLACE_ME|<[a-z-]+>")


def stand_in(variable: str) -> str:
    """An obviously fake value long enough for ``variable``'s production minimum."""
    return f"test-only-{variable.lower().replace('_', '-')}-" + "x" * max(
        64, secret_length_min(variable)
    )


def settings_problems(
    env: Mapping[str, str | None], substitutions: Mapping[str, str] | None = None
) -> list[str]:
    """Load the environment a file gives a container through config.py, with what the file
    leaves to the deployment (``${X:?…}``, ``REPLACE_ME``, ``sync: false``: given as None)
    replaced by fake values: every value the file does give must parse and validate."""
    from escrow_stream.config import ConfigError, load_settings

    environ: dict[str, str] = {}
    for var, value in env.items():
        text = "" if value is None else str(value)
        for old, new in (substitutions or {}).items():
            text = text.replace(old, new)
        if value is None or PLACEHOLDER.search(text) or re.search(r"\$\{[^}]*\?", text):
            environ[var] = stand_in(var)
        else:
            environ[var] = resolve_default(text)
    try:
        load_settings(environ)
    except ConfigError as exc:
        return str(exc).splitlines()
    return []
