"""The dashboard and alert rules (``deploy/``) against a live worker's ``/metrics``: every
metric they name is exported, and the new metrics (webhooks, provider calls, the database
pool, consumer lag, readiness) move when the worker does the work they count."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role, issue_token
from tests.harness import REPO, Stack, WorkerProcess, deployment

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "deploy" / "grafana" / "escrow-stream.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
#: What the issue asks the dashboard and the rules to cover.
REQUIRED_PANELS = (
    "Commands by outcome",
    "Consumer lag (escrow-commands)",
    "DLQ messages by reason",
    "Outbox pending and lag",
    "Settlements: confirmed and failed",
    "Webhook results",
    "HTTP requests by status",
    "HTTP latency",
)
REQUIRED_ALERTS = (
    "EscrowConsumerLagGrowing",
    "EscrowCommandsDeadLettered",
    "EscrowOutboxDeadLetters",
    "EscrowSettlementFailureRate",
    "EscrowsPastDeadline",
    "EscrowUnmatchedFunds",
    "EscrowWorkerNotReady",
)
#: Series Prometheus makes itself (a scrape's health), never exported by the worker.
PROMETHEUS_SERIES = frozenset({"up"})
#: Grafana's variables, as a value PromQL accepts (to check the dashboard's queries).
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}
WAIT_S = 30.0


# -- PromQL: the metric names an expression reads ---------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects: identifiers that are neither functions or
    aggregations (followed by ``(``), keywords, label names nor Grafana variables."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LISTS.sub("", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_reads_selectors_only() -> None:
    expr = (
        'sum by (le, route) (rate(escrow_http_request_seconds_bucket{job=~"$job", '
        'route!="/x"}[$__rate_interval])) / on (route) group_left() '
        "escrow_outbox_pending offset 5m unless up == 0 or time() - x_total > bool 1"
    )
    assert metric_names(expr) == {
        "escrow_http_request_seconds_bucket",
        "escrow_outbox_pending",
        "up",
        "x_total",
    }


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    document = json.loads(DASHBOARD.read_text())
    found = []
    for panel in document["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def every_expression() -> list[tuple[str, str]]:
    rules = [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    return dashboard_queries() + rules


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    document = json.loads(DASHBOARD.read_text())
    assert document["uid"] == "escrow-stream" and document["title"]
    assert isinstance(document["schemaVersion"], int)
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in document["panels"]}
    assert set(REQUIRED_PANELS) <= titles, set(REQUIRED_PANELS) - titles
    for panel in document["panels"]:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert metric_names(target["expr"]), (panel["title"], target["expr"])
    for name in ("job", "instance"):  # query variables read through the datasource too
        assert variables[name]["datasource"]["uid"] == "${datasource}"


DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def test_alert_rules_are_well_formed() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(REQUIRED_ALERTS) <= set(names), set(REQUIRED_ALERTS) - set(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert "for" not in rule or DURATION.match(rule["for"]), rule["alert"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
        assert metric_names(expr), rule["alert"]


def promtool() -> str:
    """``PROMTOOL``, else ``.stack/bin/promtool`` (``scripts/tools.sh`` puts it there; ``make
    test`` runs it), else PATH; a missing promtool fails the test (it is part of the set-up)."""
    for candidate in (os.environ.get("PROMTOOL"), str(REPO / ".stack" / "bin" / "promtool")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found (PROMTOOL, .stack/bin/promtool or PATH): run scripts/tools.sh"
        )
    return found


def test_promtool_accepts_the_rules_and_the_dashboard_queries(tmp_path: Path) -> None:
    tool = promtool()
    checked = subprocess.run(
        [tool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout + checked.stderr
    # the dashboard's queries, with Grafana's variables given values, as recording rules
    records = []
    for number, (title, expr) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, (title, expr)
        records.append({"record": f"dashboard:query_{number}", "expr": expr})
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = subprocess.run(
        [tool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


#: ``promtool test rules`` scenarios: input series (1-minute steps; ``_`` = no sample),
#: and per evaluation time the alerts expected firing, as their label sets (the rule's
#: ``severity`` is added).  Each quiet case is a place a naive rule would fire wrongly.
W1 = 'instance="w1:3000", job="escrow-stream"'
W2 = 'instance="w2:3000", job="escrow-stream"'
STRIPE_RETURNING = 'provider="stripe", reason="r", status="RETURNING"'
CUSTODIAN_REVIEW = 'provider="custodian", reason="r", status="NEEDS_REVIEW"'
CUSTODIAN_MISSING = 'provider="custodian", kind="missing_at_provider"'
RULE_SCENARIOS: list[dict[str, Any]] = [
    {
        "series": {
            f'escrow_consumer_lag{{{W1}, topic="c", partition="0"}}': "0+10x30",
            f'escrow_consumer_lag{{{W1}, topic="d", partition="0"}}': "100x30",
        },
        "expect": {
            "EscrowConsumerLagGrowing": {"3m": [], "12m": [{"topic": "c"}]},
        },
    },
    {  # a labelled counter that appears at 20m with 1, then stays
        "series": {f'escrow_dead_letters_total{{{W1}, reason="invalid_json"}}': "_x19 1x30"},
        "expect": {"EscrowCommandsDeadLettered": {"10m": [], "22m": [{}], "45m": []}},
    },
    {  # an existing one that grows
        "series": {f'escrow_dead_letters_total{{{W1}, reason="unknown_type"}}': "3x29 4x20"},
        "expect": {"EscrowCommandsDeadLettered": {"25m": [], "35m": [{}]}},
    },
    {
        "series": {f"escrow_outbox_dead_letters_total{{{W1}}}": "0x10 1x30"},
        "expect": {"EscrowOutboxDeadLetters": {"5m": [], "12m": [{}], "35m": []}},
    },
    {
        "series": {
            f'escrow_commands_total{{{W1}, type="ConfirmSettlement", outcome="accepted"}}': (
                "0+10x60"
            ),
            f'escrow_commands_total{{{W1}, type="RecordSettlementFailure", outcome="accepted"}}': (
                "_x20 0+2x40"
            ),
        },
        "expect": {"EscrowSettlementFailureRate": {"15m": [], "45m": [{}]}},
    },
    {
        "series": {
            f"escrow_timeouts_overdue{{{W1}}}": "3x40",
            f"escrow_timeouts_overdue{{{W2}}}": "0x40",
        },
        "expect": {"EscrowsPastDeadline": {"15m": [], "25m": [{}]}},
    },
    {
        "series": {
            f"escrow_unmatched_funds_total{{{W1}, {STRIPE_RETURNING}}}": "_x10 1x30",
            f"escrow_unmatched_funds_total{{{W2}, {CUSTODIAN_REVIEW}}}": "_x10 1x30",
        },
        "expect": {
            "EscrowUnmatchedFunds": {
                "5m": [],
                "12m": [
                    {"provider": "stripe", "status": "RETURNING"},
                    {"provider": "custodian", "status": "NEEDS_REVIEW"},
                ],
                "35m": [],
            },
            "EscrowUnmatchedFundsNeedReview": {"12m": [{}], "35m": []},
        },
    },
    {  # the newest run found differences; an older run on another worker is not counted
        "series": {
            f"escrow_reconcile_last_run_timestamp{{{W1}}}": "1000x20",
            f"escrow_reconcile_last_run_timestamp{{{W2}}}": "2000x20",
            f'escrow_reconcile_differences{{{W1}, provider="stripe", kind="amount_differs"}}': (
                "2x20"
            ),
            f"escrow_reconcile_differences{{{W2}, {CUSTODIAN_MISSING}}}": "1x20",
        },
        "expect": {
            "EscrowReconcileDifferences": {
                "5m": [{"provider": "custodian", "kind": "missing_at_provider"}]
            }
        },
    },
    {
        "series": {
            f"escrow_worker_ready{{{W1}}}": "1x5 0x20",
            f"escrow_worker_ready{{{W2}}}": "-1x25",
        },
        "expect": {
            "EscrowWorkerNotReady": {
                "8m": [],
                "15m": [{"instance": "w1:3000", "job": "escrow-stream"}],
            }
        },
    },
    {
        "series": {
            f"up{{{W1}}}": "1x5 0x10",
            'up{instance="10.0.0.7:9090", job="kubernetes-pods", namespace="escrow-stream"}': (
                "1x9 0x10"
            ),
            'up{instance="10.0.0.9:9090", job="kubernetes-pods", namespace="other"}': "0x15",
        },
        "expect": {
            "EscrowWorkerDown": {
                "6m": [],
                "10m": [{"instance": "w1:3000", "job": "escrow-stream"}],
                "12m": [
                    {"instance": "w1:3000", "job": "escrow-stream"},
                    {
                        "instance": "10.0.0.7:9090",
                        "job": "kubernetes-pods",
                        "namespace": "escrow-stream",
                    },
                ],
            }
        },
    },
    {
        "series": {
            f"escrow_db_pool_in_use{{{W1}}}": "9x20",
            f"escrow_db_pool_max{{{W1}}}": "10x20",
            f"escrow_db_pool_in_use{{{W2}}}": "2x20",
            f"escrow_db_pool_max{{{W2}}}": "10x20",
        },
        "expect": {"EscrowDatabasePoolSaturated": {"10m": [{"instance": "w1:3000"}]}},
    },
]


def test_promtool_fires_the_alerts_when_and_only_when_meant(tmp_path: Path) -> None:
    """``promtool test rules`` on the rules (annotations left out: they are prose) with the
    scenarios above."""
    tool = promtool()
    document = yaml.safe_load(ALERTS.read_text())
    severity = {}
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
            severity[rule["alert"]] = rule["labels"]["severity"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(document))
    tests = []
    for scenario in RULE_SCENARIOS:
        checks = [
            {
                "eval_time": at,
                "alertname": name,
                "exp_alerts": [
                    {"exp_labels": {**labels, "severity": severity[name]}} for labels in firing
                ],
            }
            for name, times in scenario["expect"].items()
            for at, firing in times.items()
        ]
        tests.append(
            {
                "interval": "1m",
                "input_series": [
                    {"series": series, "values": values}
                    for series, values in scenario["series"].items()
                ],
                "alert_rule_test": checks,
            }
        )
    tested = {name for scenario in RULE_SCENARIOS for name in scenario["expect"]}
    assert set(REQUIRED_ALERTS) <= tested
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts.test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    checked = subprocess.run(
        [tool, "test", "rules", "alerts.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- a live worker ----------------------------------------------------------------------


@dataclass
class Scrape:
    """One ``GET /metrics``: every sample, and the names the worker declares."""

    samples: list[tuple[str, dict[str, str], float]]
    declared: set[str]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0: none)."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and labels.items() <= ls.items() for n, ls, _ in self.samples)


def scrape(process: WorkerProcess) -> Scrape:
    with urllib.request.urlopen(f"{process.base_url}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: list[tuple[str, dict[str, str], float]] = []
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.add(family.name)
        if family.type == "counter":
            declared |= {f"{family.name}_total", f"{family.name}_created"}
        if family.type == "histogram":
            declared |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum", "created")}
        for sample in family.samples:
            declared.add(sample.name)
            samples.append((sample.name, dict(sample.labels), sample.value))
    return Scrape(samples, declared)


def scraped_until(
    process: WorkerProcess, ready: Callable[[Scrape], bool], timeout_s: float = WAIT_S
) -> Scrape:
    """Scrape until ``ready`` holds (bounded); the last scrape either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = scrape(process)
        if ready(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def request(
    process: WorkerProcess,
    method: str,
    path: str,
    bearer: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    sent = urllib.request.Request(f"{process.base_url}{path}", data=data, method=method)
    if bearer is not None:
        sent.add_header("Authorization", f"Bearer {bearer}")
    if data is not None:
        sent.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        sent.add_header(name, value)
    try:
        with urllib.request.urlopen(sent, timeout=35) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read() or b"null")


def token(stack: Stack, sub: str, role: Role = Role.USER) -> str:
    secret = stack.settings.jwt_secret.get_secret_value()
    return issue_token(secret, sub, role, datetime.now(UTC), timedelta(minutes=10))


def stripe_signature(secret: str, body: bytes, at: int) -> str:
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def custodian_headers(secret: str, body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Custodian-Timestamp": stamp, "X-Custodian-Signature": mac}


@dataclass
class Live:
    stack: Stack
    process: WorkerProcess
    buyer: str
    seller: str
    escrow_id: str

    @property
    def stripe_secret(self) -> str:
        return self.stack.settings.stripe_webhook_secret.get_secret_value()

    @property
    def custodian_secret(self) -> str:
        return self.stack.settings.custodian_webhook_secret.get_secret_value()

    def stripe_webhook(self, body: bytes, signature: str) -> int:
        status, _ = request(
            self.process,
            "POST",
            "/api/webhooks/stripe",
            raw=body,
            headers={"Stripe-Signature": signature},
        )
        return status

    def custodian_webhook(self, body: bytes, headers: dict[str, str]) -> int:
        status, _ = request(
            self.process, "POST", "/api/webhooks/custodian", raw=body, headers=headers
        )
        return status


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings) -> Iterator[Live]:
    """A worker as deployed (KYC gating, payment effects on stripe-mock) that has done a
    little real work: two parties verified, one escrow created (its PaymentIntent made at
    Stripe), one webhook, one command dead-lettered."""
    run = uuid.uuid4().hex[:10]
    with deployment(
        tmp_path_factory.mktemp("observability"),
        FEATURE_KYC_GATING="true",
        PAYMENTS_EFFECTS_ENABLED="true",
        STRIPE_WEBHOOK_SECRET=f"whsec_test_{run}",
        CUSTODIAN_WEBHOOK_SECRET=f"test-custodian-webhook-secret-{run}",
    ) as (stack, process):
        buyer, seller = f"obs-buyer-{run}", f"obs-seller-{run}"
        admin = token(stack, "ops", Role.ADMIN)
        for user in (buyer, seller):
            status, _ = request(process, "PUT", f"/api/kyc/{user}", admin, {"status": "VERIFIED"})
            assert status == 200
        body = {
            "offerId": f"offer-{run}",
            "contractId": f"contract-{run}",
            "rail": "STRIPE",
            "amount": "10000",
            "currency": "USD",
            "sellerId": seller,
        }
        status, escrow = request(
            process, "POST", "/api/escrow", token(stack, buyer), body, {"Prefer": "wait=30"}
        )
        assert status == 201, escrow
        live = Live(stack, process, buyer, seller, escrow["escrowId"])
        event = json.dumps({"id": f"evt_{run}", "type": "payment_intent.created"}).encode()
        at = int(time.time())
        assert live.stripe_webhook(event, stripe_signature(live.stripe_secret, event, at)) == 200
        asyncio.run(stack.send_raw([(b"not-an-escrow", b"{not json", [])]))
        yield live


def test_every_metric_the_dashboard_and_rules_name_is_exported(live: Live) -> None:
    named: dict[str, list[str]] = {}
    for where, expr in every_expression():
        for name in metric_names(expr):
            named.setdefault(name, []).append(where)
    # what the fixture's work produces samples of (the others may have none yet: a labelled
    # series appears when first counted, but its name is declared from the start)
    worked = (
        "escrow_commands_total",
        "escrow_command_decide_seconds_bucket",
        "escrow_mirror_events_total",
        "escrow_outbox_published_total",
        "escrow_outbox_pending",
        "escrow_outbox_lag_seconds",
        "escrow_dead_letters_total",
        "escrow_consumer_lag",
        "escrow_processor_last_progress_timestamp",
        "escrow_webhooks_total",
        "escrow_payment_effects_total",
        "escrow_provider_requests_total",
        "escrow_provider_request_seconds_bucket",
        "escrow_http_requests_total",
        "escrow_http_request_seconds_bucket",
        "escrow_db_pool_in_use",
        "escrow_db_pool_max",
    )
    found = scraped_until(live.process, lambda s: all(s.has(name) for name in worked))
    missing = {
        name: where
        for name, where in named.items()
        if name not in found.declared and name not in PROMETHEUS_SERIES
    }
    assert not missing, f"named in deploy/ but not exported: {missing}"
    for name in worked:
        assert name in named, f"{name}: the dashboard should show it"
        assert found.has(name), f"{name}: no sample after the work the worker did"


def test_consumer_lag_is_reported_for_every_command_partition(live: Live) -> None:
    topic = live.stack.settings.kafka_commands_topic
    found = scraped_until(
        live.process,
        lambda s: all(
            s.has("escrow_consumer_lag", topic=topic, partition=str(p)) for p in range(6)
        ),
    )
    lags = {
        labels["partition"]: value
        for name, labels, value in found.samples
        if name == "escrow_consumer_lag" and labels["topic"] == topic
    }
    assert set(lags) == {str(p) for p in range(6)}, lags
    assert all(value >= 0 for value in lags.values())
    # everything sent so far has been processed and committed: the lag drains to 0
    drained = scraped_until(
        live.process, lambda s: s.value("escrow_consumer_lag", topic=topic) == 0
    )
    assert drained.value("escrow_consumer_lag", topic=topic) == 0


def test_a_dead_lettered_command_is_counted(live: Live) -> None:
    found = scraped_until(
        live.process, lambda s: s.value("escrow_dead_letters_total", reason="invalid_json") >= 1
    )
    assert found.value("escrow_dead_letters_total", reason="invalid_json") == 1
    assert found.value("escrow_commands_total", outcome="dead_letter") == 1


def test_stripe_webhooks_are_counted_by_result(live: Live) -> None:
    def count(result: str) -> float:
        return scrape(live.process).value("escrow_webhooks_total", source="stripe", result=result)

    before = {r: count(r) for r in ("bad_signature", "accepted", "duplicate", "ignored")}
    body = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "type": "payment_intent.payment_failed",
            "data": {
                "object": {
                    "id": f"pi_{uuid.uuid4().hex[:14]}",
                    "metadata": {"escrow_id": live.escrow_id},
                    "last_payment_error": {"code": "card_declined", "message": "declined"},
                }
            },
        }
    ).encode()
    now = int(time.time())
    assert live.stripe_webhook(body, stripe_signature("whsec_not_ours", body, now)) == 400
    assert count("bad_signature") == before["bad_signature"] + 1
    signed = stripe_signature(live.stripe_secret, body, now)
    assert live.stripe_webhook(body, signed) == 200
    assert count("accepted") == before["accepted"] + 1
    assert live.stripe_webhook(body, signed) == 200  # Stripe delivers it again
    assert count("duplicate") == before["duplicate"] + 1
    assert count("accepted") == before["accepted"] + 1
    other = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "customer.created"}).encode()
    assert live.stripe_webhook(other, stripe_signature(live.stripe_secret, other, now)) == 200
    assert count("ignored") == before["ignored"] + 1


def test_custodian_webhooks_are_counted_by_result(live: Live) -> None:
    def count(result: str) -> float:
        found = scrape(live.process)
        return found.value("escrow_webhooks_total", source="custodian", result=result)

    before = {r: count(r) for r in ("bad_signature", "invalid", "ignored")}
    body = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "wallet.updated"}).encode()
    forged = custodian_headers("not-the-secret-of-this-deployment", body)
    assert live.custodian_webhook(body, forged) == 400
    assert count("bad_signature") == before["bad_signature"] + 1
    assert live.custodian_webhook(body, custodian_headers(live.custodian_secret, body)) == 200
    assert count("ignored") == before["ignored"] + 1
    junk = b'["signed but not an event"]'
    assert live.custodian_webhook(junk, custodian_headers(live.custodian_secret, junk)) == 400
    assert count("invalid") == before["invalid"] + 1


def test_stripe_calls_are_counted_by_provider_and_result(live: Live) -> None:
    """The create of the fixture made a PaymentIntent at stripe-mock through the SDK; one
    more escrow makes one more call."""
    before = scraped_until(
        live.process,
        lambda s: s.value("escrow_provider_requests_total", provider="stripe", result="ok") >= 1,
    ).value("escrow_provider_requests_total", provider="stripe", result="ok")
    assert before >= 1
    body = {
        "offerId": "offer-2",
        "contractId": "contract-2",
        "rail": "STRIPE",
        "amount": "2500",
        "currency": "USD",
        "sellerId": live.seller,
    }
    status, _ = request(
        live.process,
        "POST",
        "/api/escrow",
        token(live.stack, live.buyer),
        body,
        {"Prefer": "wait=30"},
    )
    assert status == 201
    found = scraped_until(
        live.process,
        lambda s: (
            s.value("escrow_provider_requests_total", provider="stripe", result="ok") > before
        ),
    )
    assert found.value("escrow_provider_requests_total", provider="stripe", result="ok") > before
    assert found.value("escrow_provider_request_seconds_count", provider="stripe") >= before + 1
    assert found.value("escrow_payment_effects_total", effect="instructions", result="succeeded")


def test_the_pool_gauge_counts_connections_held_by_requests(live: Live) -> None:
    """Four KYC updates wait on a row this test holds locked: each holds a pool connection
    until the lock goes."""
    user = f"obs-locked-{uuid.uuid4().hex[:8]}"
    admin = token(live.stack, "ops", Role.ADMIN)
    assert request(live.process, "PUT", f"/api/kyc/{user}", admin, {"status": "PENDING"})[0] == 200
    pool_max = live.stack.settings.database_pool_size
    blocked = 4
    assert scrape(live.process).value("escrow_db_pool_max") == pool_max

    async def hold_the_row(release: threading.Event, answers: list[int]) -> None:
        conn = await asyncpg.connect(live.stack.settings.database_url.get_secret_value())
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM kyc_status WHERE user_id = $1 FOR UPDATE", user)
                callers = [
                    threading.Thread(
                        target=lambda: answers.append(
                            request(
                                live.process,
                                "PUT",
                                f"/api/kyc/{user}",
                                admin,
                                {"status": "VERIFIED"},
                            )[0]
                        )
                    )
                    for _ in range(blocked)
                ]
                for caller in callers:
                    caller.start()
                await asyncio.to_thread(release.wait, WAIT_S)
            for caller in callers:
                await asyncio.to_thread(caller.join, WAIT_S)
        finally:
            await conn.close()

    release = threading.Event()
    answers: list[int] = []
    holder = threading.Thread(target=lambda: asyncio.run(hold_the_row(release, answers)))
    holder.start()
    try:
        held = scraped_until(live.process, lambda s: s.value("escrow_db_pool_in_use") >= blocked)
        assert held.value("escrow_db_pool_in_use") >= blocked
        assert held.value("escrow_db_pool_size") >= held.value("escrow_db_pool_in_use")
        assert answers == []  # still waiting on the lock
    finally:
        release.set()
        holder.join(WAIT_S)
    assert answers == [200] * blocked
    freed = scraped_until(live.process, lambda s: s.value("escrow_db_pool_in_use") < blocked)
    assert freed.value("escrow_db_pool_in_use") < blocked


def test_readiness_and_http_latency_are_exported(live: Live) -> None:
    status, body = request(live.process, "GET", "/ready")
    assert (status, body["status"]) == (200, "ready")
    found = scrape(live.process)
    assert found.value("escrow_worker_ready") == 1
    assert found.value("escrow_http_request_seconds_count", method="POST", route="/api/escrow") >= 1
    assert (
        found.value("escrow_http_requests_total", method="POST", route="/api/escrow", status="201")
        >= 1
    )
