"""``scripts/smoke.sh BASE_URL TOKEN``, the post-deployment verification, against a live
worker as deployed (KYC gating on, payment effects on stripe-mock): it passes, what it
claims is true (the command is on ``escrow-commands``), and it fails loudly otherwise."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role, issue_token
from tests.harness import REPO, Stack, WorkerProcess, deployment, free_port
from tests.integration.test_observability import request

pytestmark = pytest.mark.integration

SMOKE = REPO / "scripts" / "smoke.sh"
SMOKE_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(
        tmp_path_factory.mktemp("smoke"),
        FEATURE_KYC_GATING="true",
        PAYMENTS_EFFECTS_ENABLED="true",
    ) as running:
        yield running


def token(stack: Stack, sub: str, role: Role = Role.USER) -> str:
    secret = stack.settings.jwt_secret.get_secret_value()
    return issue_token(secret, sub, role, datetime.now(UTC), timedelta(minutes=10))


def smoke(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The script as an operator runs it; ``python3`` is this interpreter."""
    path = f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return subprocess.run(
        ["bash", str(SMOKE), *args],
        env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env},
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )


def verify(stack: Stack, process: WorkerProcess, *users: str) -> None:
    """KYC: an admin marks ``users`` VERIFIED through the API."""
    admin = token(stack, "ops", Role.ADMIN)
    for user in users:
        status, _ = request(process, "PUT", f"/api/kyc/{user}", admin, {"status": "VERIFIED"})
        assert status == 200


def test_smoke_passes_and_its_command_is_on_kafka(worker: tuple[Stack, WorkerProcess]) -> None:
    stack, process = worker
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"smoke-buyer-{run}", f"smoke-seller-{run}"
    verify(stack, process, buyer, seller)
    buyer_token = token(stack, buyer)

    result = smoke(process.base_url, buyer_token, SMOKE_SELLER_ID=seller, SMOKE_WAIT_S="60")

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert buyer_token not in output
    for line in (
        "ok    GET /health: ok",
        "ok    GET /ready: ready",
        "ok    POST /api/escrow: 202",
        "consumed from Kafka and ACCEPTED",
        ": AWAIT_FUNDS",
        "EscrowCreated of",
        "cancelled",
        f"smoke: all checks passed against {process.base_url}",
    ):
        assert line in result.stdout, output
    found = re.search(r"escrow (\S+), command (\S+)", result.stdout)
    assert found is not None, output
    escrow_id, command_id = found.groups()

    # what the script inferred from the API, read on the broker itself
    def commands_of(records: list[Any]) -> list[dict[str, Any]]:
        values = [json.loads(r.value) for r in records]
        return [v for v in values if isinstance(v, dict) and v.get("escrowId") == escrow_id]

    records = asyncio.run(
        stack.read(
            stack.settings.kafka_commands_topic,
            lambda rs: {"CreateEscrow", "CancelEscrow"} <= {c["type"] for c in commands_of(rs)},
        )
    )
    commands = {c["type"]: c for c in commands_of(records)}
    assert commands["CreateEscrow"]["commandId"] == command_id
    assert commands["CreateEscrow"]["actor"]["id"] == buyer
    assert commands["CreateEscrow"]["payload"]["sellerId"] == seller
    status, escrow = request(process, "GET", f"/api/escrow/{escrow_id}", token(stack, buyer))
    assert (status, escrow["status"]) == (200, "CANCELLED")


def test_smoke_fails_on_an_unverified_seller(worker: tuple[Stack, WorkerProcess]) -> None:
    stack, process = worker
    run = uuid.uuid4().hex[:8]
    buyer = f"smoke-buyer-{run}"
    verify(stack, process, buyer)

    result = smoke(process.base_url, token(stack, buyer), SMOKE_SELLER_ID=f"nobody-{run}")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  POST /api/escrow answered 403" in result.stderr
    assert "KYC_REQUIRED" in result.stderr
    assert "ok    GET /ready: ready" in result.stdout


def test_smoke_fails_when_nothing_answers() -> None:
    result = smoke(f"http://127.0.0.1:{free_port()}", "not-a-token")
    assert result.returncode == 1
    assert "FAIL  GET /health answered 000" in result.stderr


def test_smoke_needs_both_arguments() -> None:
    result = smoke("http://127.0.0.1:1")
    assert result.returncode == 2
    assert "usage:" in result.stderr
