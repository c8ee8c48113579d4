"""The authorization matrix: every endpoint by no token / expired / other user / party / admin."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role, issue_token
from tests.e2e.test_http_flow import confirm_funds, create_body
from tests.e2e.test_http_reads import call, token
from tests.harness import Stack, WorkerProcess, deployment, eventually

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
BUYER, SELLER, OTHER = f"mx-buyer-{RUN}", f"mx-seller-{RUN}", f"mx-other-{RUN}"
WHO = ("none", "expired", "other", "party", "admin")

#: endpoint → (method, path template, the party who may use it or None, body, expected
#: statuses for none / expired / other user / party / admin). 202 = accepted for processing.
MATRIX: list[tuple[str, str, str | None, dict[str, Any] | None, tuple[int, ...]]] = [
    ("GET", "/api/escrow/{id}", BUYER, None, (401, 401, 403, 200, 200)),
    ("GET", "/api/escrow/{id}/events", SELLER, None, (401, 401, 403, 200, 200)),
    ("GET", "/api/escrow/{id}/commands/{cid}", BUYER, None, (401, 401, 403, 200, 200)),
    ("GET", "/api/escrow", BUYER, None, (401, 401, 200, 200, 200)),
    ("POST", "/api/escrow", BUYER, "create", (401, 401, 202, 202, 403)),
    ("POST", "/api/escrow/{id}/deliver", SELLER, {}, (401, 401, 403, 202, 403)),
    ("POST", "/api/escrow/{id}/release", BUYER, None, (401, 401, 403, 202, 202)),
    ("POST", "/api/escrow/{id}/cancel", BUYER, None, (401, 401, 403, 202, 202)),
    ("POST", "/api/escrow/{id}/dispute", BUYER, {"reason": "late"}, (401, 401, 403, 202, 403)),
    (
        "POST",
        "/api/escrow/{id}/dispute/resolve",
        BUYER,
        {"resolution": "REFUND", "reason": "x"},
        (401, 401, 403, 403, 202),
    ),
    ("POST", "/api/escrow/{id}/refund", SELLER, {"reason": "x"}, (401, 401, 403, 202, 202)),
    ("POST", "/api/escrow/{id}/milestones/m1/deliver", SELLER, None, (401, 401, 403, 202, 403)),
    ("POST", "/api/escrow/{id}/milestones/m1/release", BUYER, None, (401, 401, 403, 202, 202)),
    # payout accounts (SPEC §10): users for themselves; services and admins for anyone
    ("POST", "/api/payout-accounts/stripe", SELLER, None, (401, 401, 201, 201, 403)),
    (
        "PUT",
        "/api/payout-accounts/usdc",
        SELLER,
        {"walletAddress": "0x1"},
        (401, 401, 422, 422, 403),
    ),
    ("GET", "/api/payout-accounts/me", SELLER, None, (401, 401, 200, 200, 403)),
    (
        "PUT",
        f"/api/payout-accounts/{SELLER}",
        SELLER,
        {"rail": "STRIPE", "accountId": "acct_matrix"},
        (401, 401, 403, 403, 200),
    ),
    ("GET", f"/api/payout-accounts/{SELLER}", SELLER, None, (401, 401, 403, 200, 200)),
]


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(tmp_path_factory.mktemp("matrix")) as running:
        yield running


def bearer_for(stack: Stack, who: str, party: str | None) -> str | None:
    secret = stack.settings.jwt_secret.get_secret_value()
    now = datetime.now(UTC)
    return {
        "none": None,
        "expired": issue_token(
            secret, BUYER, Role.USER, now - timedelta(hours=2), timedelta(hours=1)
        ),
        "other": token(stack, OTHER),
        "party": token(stack, party or BUYER),
        "admin": token(stack, "mx-admin", Role.ADMIN),
    }[who]


def test_every_endpoint_for_every_caller(worker: tuple[Stack, WorkerProcess]) -> None:
    stack, process = worker
    milestones = [{"milestoneId": "m1", "title": "all", "amount": "10000"}]
    code, _, escrow = call(
        process,
        "POST",
        "/api/escrow",
        token(stack, BUYER),
        {**create_body(SELLER), "milestones": milestones},
        {"Prefer": "wait=30"},
    )
    assert code == 201, escrow
    escrow_id = escrow["escrowId"]
    asyncio.run(stack.send([confirm_funds(escrow_id, f"pi-{RUN}")]))
    asyncio.run(stack.events(lambda es: sum(e["escrowId"] == escrow_id for e in es) >= 2))

    async def mirrored() -> bool:  # /events reads the mirror, which trails the table
        admin = token(stack, "mx-admin", Role.ADMIN)
        return call(process, "GET", f"/api/escrow/{escrow_id}/events", admin)[0] == 200

    assert asyncio.run(eventually(mirrored, timeout_s=30))

    got: dict[tuple[str, str, str], int] = {}
    want: dict[tuple[str, str, str], int] = {}
    for method, template, party, body, expected in MATRIX:
        path = template.format(id=escrow_id, cid="some-command")
        for who, status in zip(WHO, expected, strict=True):
            payload = create_body(SELLER) if body == "create" else body
            code, _, response = call(process, method, path, bearer_for(stack, who, party), payload)
            got[(method, template, who)] = code
            want[(method, template, who)] = status
            if code >= 400:
                assert response["code"], (method, template, who, response)
    assert got == want
