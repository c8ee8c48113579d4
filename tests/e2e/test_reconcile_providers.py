"""``escrow-stream reconcile --providers`` against real escrows: a worker funds, releases and
refunds them through stripe-mock (behind the remembering proxy) and the custodian stand-in,
then the command, run as an operator runs it (a subprocess on the test database), compares.

Also the worker's own loop (``RECONCILE_INTERVAL_MINUTES``): one run at start-up, its
differences in the log and in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from escrow_stream.config import Settings
from tests.builders import TEST_PAYOUTS
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.e2e.test_webhooks_stripe import deliver_signed, intent_succeeded
from tests.harness import Stack, WorkerProcess, activate_payouts, deployment
from tests.standins.custodian import CustodianStandin, address_for
from tests.standins.risk import ChainalysisStandin, TrmStandin
from tests.standins.stripe_proxy import StripeProxy

pytestmark = pytest.mark.integration

WAIT = {"Prefer": "wait=30"}
USD = 10_000
USDC = 25_000_000
USDC_FEE = USDC * 500 // 10_000
SETTLED_WAIT_S = 60.0
METRICS_WAIT_S = 90.0


@dataclass
class Providers:
    proxy: StripeProxy
    custodian: CustodianStandin
    trm: TrmStandin
    chainalysis: ChainalysisStandin

    def env(self) -> dict[str, str]:
        return {
            "PAYMENTS_EFFECTS_ENABLED": "true",
            "STRIPE_API_BASE": self.proxy.url,
            "STRIPE_WEBHOOK_SECRET": f"whsec_test_{uuid.uuid4().hex}",
            "CUSTODIAN_API_URL": self.custodian.url,
            "CUSTODIAN_API_KEY": self.custodian.api_key,
            "CUSTODIAN_WEBHOOK_SECRET": self.custodian.webhook_secret,
            "TRM_API_URL": self.trm.url,
            "TRM_API_KEY": self.trm.api_key,
            "CHAINALYSIS_API_URL": self.chainalysis.url,
            "CHAINALYSIS_API_KEY": self.chainalysis.api_key,
            "ESCROW_RETRY_DELAY_MS": "50",
            "ESCROW_MAX_RETRIES": "1",
            "PROVIDER_TIMEOUT_MS": "3000",
        }


@dataclass
class Settled:
    """The escrows the module's worker took through the providers."""

    stack: Stack
    worker: WorkerProcess
    released: str  # Stripe, released
    refunded: str  # Stripe, refunded
    usdc: str  # USDC, released
    transfer_id: str  # the Stripe Transfer of the release


@pytest.fixture(scope="module")
def providers(stack_settings: Settings) -> Iterator[Providers]:
    run = uuid.uuid4().hex
    found = Providers(
        StripeProxy(),
        CustodianStandin(api_key=f"custodian-key-{run}", webhook_secret=f"cw-{run}"),
        TrmStandin(api_key=f"trm-key-{run}"),
        ChainalysisStandin(api_key=f"ca-key-{run}"),
    )
    servers = (found.proxy, found.custodian, found.trm, found.chainalysis)
    for server in servers:
        server.start()
    yield found
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory, providers: Providers) -> Iterator[Settled]:
    with deployment(tmp_path_factory.mktemp("reconcile"), **providers.env()) as (stack, worker):
        providers.custodian.webhook_url = f"http://127.0.0.1:{worker.port}/api/webhooks/custodian"
        released, transfer_id = stripe_escrow(stack, worker, providers.proxy, "release")
        refunded, _ = stripe_escrow(stack, worker, providers.proxy, "refund")
        usdc = usdc_escrow(stack, worker, providers.custodian)
        yield Settled(stack, worker, released, refunded, usdc, transfer_id)


def act(stack: Stack, worker: WorkerProcess, user: str, escrow_id: str, action: str) -> None:
    body = {"reason": "out of stock"} if action == "refund" else {}
    path = f"/api/escrow/{escrow_id}/{action}"
    status, _, answer = call(worker, "POST", path, token(stack, user), body, WAIT)
    assert status == 200, answer


def stripe_escrow(
    stack: Stack, worker: WorkerProcess, proxy: StripeProxy, outcome: str
) -> tuple[str, str]:
    """Create, pay (the PaymentIntent succeeds at the provider, then its webhook), and
    release or refund; the escrow id and the provider reference of its settlement."""
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"rc-b-{run}", f"rc-s-{run}"
    asyncio.run(activate_payouts(stack.settings, seller))
    status, _, escrow = call(
        worker, "POST", "/api/escrow", token(stack, buyer), create_body(seller, USD), WAIT
    )
    assert status == 201, escrow
    escrow_id = escrow["escrowId"]
    instructed = escrow_when(stack, worker, buyer, escrow_id, lambda e: e.get("payment"), 60)
    assert instructed is not None, worker.log_tail()
    intent = instructed["payment"]["providerPaymentId"]
    proxy.mark_succeeded(intent)
    assert deliver_signed(stack, worker, intent_succeeded(escrow_id, intent, USD))[0] == 200
    held = escrow_when(stack, worker, buyer, escrow_id, lambda e: e["status"] == "FUNDS_HELD")
    assert held is not None, worker.log_tail()
    if outcome == "release":
        act(stack, worker, seller, escrow_id, "deliver")
        act(stack, worker, buyer, escrow_id, "release")
        final = "RELEASED"
    else:
        act(stack, worker, seller, escrow_id, "refund")
        final = "REFUNDED"
    done = escrow_when(
        stack, worker, buyer, escrow_id, lambda e: e["status"] == final, SETTLED_WAIT_S
    )
    assert done is not None, worker.log_tail()
    return escrow_id, settlement_reference(stack, escrow_id)


def settlement_reference(stack: Stack, escrow_id: str) -> str:
    async def read() -> str:
        conn = await asyncpg.connect(stack.settings.database_url.get_secret_value())
        try:
            return str(
                await conn.fetchval(
                    "SELECT provider_object_id FROM payment_effects "
                    "WHERE escrow_id = $1 AND effect = 'SETTLEMENT' AND state = 'SUCCEEDED'",
                    escrow_id,
                )
            )
        finally:
            await conn.close()

    return asyncio.run(read())


def usdc_escrow(stack: Stack, worker: WorkerProcess, custodian: CustodianStandin) -> str:
    """Create a USDC escrow, pay its deposit address (screened clean), deliver, release."""
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"rc-ub-{run}", f"rc-us-{run}"
    asyncio.run(activate_payouts(stack.settings, seller))
    body = {**create_body(seller, USDC), "rail": "USDC_BASE", "currency": "USDC"}
    status, _, escrow = call(worker, "POST", "/api/escrow", token(stack, buyer), body, WAIT)
    assert status == 201, escrow
    escrow_id = escrow["escrowId"]
    instructed = escrow_when(stack, worker, buyer, escrow_id, lambda e: e.get("payment"), 60)
    assert instructed is not None, worker.log_tail()
    code, answer = custodian.pay(escrow_id, USDC, address_for(f"buyer:{run}"))
    assert code == 200, answer
    held = escrow_when(stack, worker, buyer, escrow_id, lambda e: e["status"] == "FUNDS_HELD", 60)
    assert held is not None, worker.log_tail()
    act(stack, worker, seller, escrow_id, "deliver")
    act(stack, worker, buyer, escrow_id, "release")
    done = escrow_when(
        stack, worker, buyer, escrow_id, lambda e: e["status"] == "RELEASED", SETTLED_WAIT_S
    )
    assert done is not None, worker.log_tail()
    (transfer,) = custodian.transfers_for(escrow_id)
    assert transfer["destination"]["address"] == TEST_PAYOUTS["USDC_BASE"]
    return escrow_id


def reconcile(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """``escrow-stream reconcile --providers`` as an operator runs it, for this deployment."""
    return subprocess.run(
        [sys.executable, "-m", "escrow_stream.cli", "reconcile", "--providers", *args],
        env={**stack.env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_clean_run_exits_0_with_a_summary(settled: Settled) -> None:
    result = reconcile(settled.stack, "--since", "1h")
    assert result.returncode == 0, result.stdout + result.stderr
    (summary,) = lines(result.stdout)
    assert summary["kind"] == "summary" and summary["differences"] == 0
    listed = summary["listed"]
    # what the worker made: 2 PaymentIntents, 1 Transfer, 1 Refund, 1 deposit, 1 transfer
    assert listed["stripe.payment_intent"] >= 2
    assert listed["stripe.transfer"] >= 1 and listed["stripe.refund"] >= 1
    assert listed["custodian.deposit"] >= 1 and listed["custodian.transfer"] >= 1


def test_provider_objects_without_records_and_records_without_objects_are_reported(
    settled: Settled, providers: Providers
) -> None:
    ghost = f"esc-ghost-{uuid.uuid4().hex[:8]}"
    intent = providers.proxy.inject(
        "/v1/payment_intents", 4_200, {"escrow_id": ghost}, transfer_group=ghost
    )
    deposit = providers.custodian.inject_deposit(ghost, 3_000_000, address_for("ghost"))
    foreign = providers.proxy.inject("/v1/payment_intents", 99, {})  # no metadata of ours
    transfer = providers.proxy.forget(settled.transfer_id)
    try:
        result = reconcile(settled.stack, "--since", "1h")
        assert result.returncode == 1, result.stdout + result.stderr
        found = lines(result.stdout)
        assert sorted((d["kind"], d["provider"], d["object"], d["objectId"]) for d in found) == [
            ("missing_at_provider", "stripe", "transfer", settled.transfer_id),
            ("missing_on_our_side", "custodian", "deposit", deposit["id"]),
            ("missing_on_our_side", "stripe", "payment_intent", intent["id"]),
        ]
        by_object = {d["objectId"]: d for d in found}
        assert by_object[intent["id"]]["escrowId"] == ghost
        assert by_object[intent["id"]]["theirs"]["amount"] == 4_200
        assert by_object[settled.transfer_id]["escrowId"] == settled.released
        assert by_object[settled.transfer_id]["ours"]["amount"] == USD - USD * 500 // 10_000
        assert json.loads(result.stderr.strip().splitlines()[-1])["differences"] == 3
    finally:
        providers.proxy.forget(intent["id"])
        providers.proxy.forget(foreign["id"])
        providers.custodian.forget(deposit["id"])
        with providers.proxy.lock:
            providers.proxy.objects["/v1/transfers"][transfer["id"]] = transfer
    assert reconcile(settled.stack, "--since", "1h").returncode == 0


def test_an_amount_that_differs_at_the_provider_is_reported(
    settled: Settled, providers: Providers
) -> None:
    (transfer,) = [t for t in providers.custodian.transfers_for(settled.usdc) if t["reference"]]
    original = transfer["amount"]
    with providers.custodian.lock:
        transfer["amount"] = str(USDC - USDC_FEE - 1)
    try:
        result = reconcile(settled.stack, "--since", "1h")
    finally:
        with providers.custodian.lock:
            transfer["amount"] = original
    assert result.returncode == 1, result.stdout + result.stderr
    found = lines(result.stdout)
    assert {(d["kind"], d["objectId"], d["escrowId"]) for d in found} == {
        ("amount_differs", transfer["id"], settled.usdc)
    }
    assert {d["ours"]["amount"] for d in found} == {USDC - USDC_FEE}


def test_since_must_be_a_moment_or_a_span(settled: Settled) -> None:
    result = reconcile(settled.stack, "--since", "yesterday")
    assert result.returncode == 2 and "7d / 36h / 90m" in result.stderr


def metrics(worker: WorkerProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"{worker.base_url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("escrow_reconcile_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_the_worker_loop_runs_once_at_start_up_and_sets_the_metrics(
    settled: Settled, providers: Providers, tmp_path: Path
) -> None:
    """A second deployment on the same providers and database: the first one's escrows are
    not its own (skipped), the injected objects with an unknown escrow id are reported."""
    ghost = f"esc-ghost-{uuid.uuid4().hex[:8]}"
    intent = providers.proxy.inject("/v1/payment_intents", 500, {"escrow_id": ghost})
    deposit = providers.custodian.inject_deposit(ghost, 1_000_000, address_for("ghost-2"))
    env = {**providers.env(), "PAYMENTS_EFFECTS_ENABLED": "false"}
    try:
        with deployment(tmp_path, "loop", RECONCILE_INTERVAL_MINUTES="60", **env) as (_, w):
            deadline = time.monotonic() + METRICS_WAIT_S
            seen = metrics(w)
            while not seen.get("escrow_reconcile_last_run_timestamp") and (
                time.monotonic() < deadline
            ):
                time.sleep(0.5)
                seen = metrics(w)
            assert seen.get("escrow_reconcile_last_run_timestamp", 0) > time.time() - 300, (
                w.log_tail()
            )

            def gauge(provider: str, kind: str) -> float:
                return seen[f'escrow_reconcile_differences{{kind="{kind}",provider="{provider}"}}']

            assert gauge("stripe", "missing_on_our_side") == 1
            assert gauge("custodian", "missing_on_our_side") == 1
            assert gauge("stripe", "missing_at_provider") == 0
            assert gauge("custodian", "amount_differs") == 0
            assert intent["id"] in w.log_tail(20_000) and "reconciliation difference" in (
                w.log_tail(20_000)
            )
    finally:
        providers.proxy.forget(intent["id"])
        providers.custodian.forget(deposit["id"])
