"""KYC gating over HTTP: unverified parties get 403 KYC_REQUIRED; admins and services set
statuses; verified parties create and release."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, token
from tests.harness import Stack, WorkerProcess, deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(tmp_path_factory.mktemp("kyc"), FEATURE_KYC_GATING="true") as running:
        yield running


def test_kyc_gates_creation_until_both_parties_are_verified(
    worker: tuple[Stack, WorkerProcess],
) -> None:
    stack, process = worker
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"kyc-b-{run}", f"kyc-s-{run}"
    status, _, problem = call(
        process, "POST", "/api/escrow", token(stack, buyer), create_body(seller)
    )
    assert (status, problem["code"]) == (403, "KYC_REQUIRED")
    assert buyer in problem["detail"] and seller in problem["detail"]

    status, _, _ = call(
        process, "PUT", f"/api/kyc/{buyer}", token(stack, buyer), {"status": "VERIFIED"}
    )
    assert status == 403  # nobody verifies themselves
    for user, who in (
        (buyer, token(stack, "ops", Role.ADMIN)),
        (seller, token(stack, "marketplace", Role.SERVICE)),
    ):
        status, _, record = call(process, "PUT", f"/api/kyc/{user}", who, {"status": "VERIFIED"})
        assert (status, record) == (200, {"userId": user, "status": "VERIFIED"})
    status, _, record = call(process, "GET", f"/api/kyc/{buyer}", token(stack, buyer))
    assert (status, record["status"]) == (200, "VERIFIED")
    status, _, _ = call(process, "GET", f"/api/kyc/{seller}", token(stack, buyer))
    assert status == 403
    status, _, problem = call(
        process, "PUT", f"/api/kyc/{buyer}", token(stack, "ops", Role.ADMIN), {"status": "MAYBE"}
    )
    assert (status, problem["code"]) == (422, "VALIDATION_FAILED")

    status, _, escrow = call(
        process,
        "POST",
        "/api/escrow",
        token(stack, buyer),
        create_body(seller),
        {"Prefer": "wait=30"},
    )
    assert (status, escrow["status"]) == (201, "AWAIT_FUNDS"), escrow
