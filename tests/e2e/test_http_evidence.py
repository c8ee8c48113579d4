"""Evidence and contract uploads over HTTP on a live worker and the stack's S3: presigned
URL → PUT → bytes in the bucket; who may ask; deliveries and disputes name uploaded keys."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from escrow_stream.config import Settings
from escrow_stream.storage import PRESIGN_EXPIRY_S, EvidenceStore
from escrow_stream.web.auth import Role
from tests.e2e.test_http_flow import confirm_funds, create_body
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.harness import Stack, WorkerProcess, eventually

pytestmark = pytest.mark.integration

WAIT = {"Prefer": "wait=20"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings) -> Iterator[Stack]:
    stack = Stack.create(tmp_path_factory.mktemp("evidence"))
    asyncio.run(stack.create_topics())
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def bucket(stack: Stack) -> EvidenceStore:
    """This deployment's own bucket, read back with boto3 independently of the worker."""
    return stack.ensure_bucket()


@pytest.fixture(scope="module")
def worker(stack: Stack, bucket: EvidenceStore) -> Iterator[WorkerProcess]:
    worker = stack.worker("api").start()
    worker.wait_healthy()
    yield worker
    assert worker.stop() == 0, worker.log_tail()


def new_escrow(stack: Stack, worker: WorkerProcess, funded: bool = False) -> tuple[str, str, str]:
    """(escrowId, buyer, seller) of a new escrow, FUNDS_HELD when ``funded``."""
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"b-{run}", f"s-{run}"
    status, _, escrow = call(
        worker, "POST", "/api/escrow", token(stack, buyer), create_body(seller), WAIT
    )
    assert status == 201, escrow
    escrow_id = escrow["escrowId"]
    if funded:
        asyncio.run(stack.send([confirm_funds(escrow_id, f"pi_{run}")]))
        held = escrow_when(stack, worker, buyer, escrow_id, lambda e: e["status"] == "FUNDS_HELD")
        assert held is not None
    return escrow_id, buyer, seller


def upload_url(
    stack: Stack, worker: WorkerProcess, escrow_id: str, user: str, content_type: str
) -> dict[str, Any]:
    path = f"/api/escrow/{escrow_id}/evidence"
    status, _, ticket = call(
        worker, "POST", path, token(stack, user), {"contentType": content_type}
    )
    assert status == 201, ticket
    return dict(ticket)


def uploaded(stack: Stack, worker: WorkerProcess, escrow_id: str, user: str) -> str:
    """The key of a PNG the user uploaded through a presigned URL."""
    ticket = upload_url(stack, worker, escrow_id, user, "image/png")
    response = httpx.put(ticket["uploadUrl"], content=b"\x89PNG proof", headers=ticket["headers"])
    assert response.status_code == 200, response.text
    return str(ticket["key"])


def test_presigned_url_over_http_uploads_to_the_bucket(
    stack: Stack, worker: WorkerProcess, bucket: EvidenceStore
) -> None:
    escrow_id, _, seller = new_escrow(stack, worker)
    before = datetime.now(UTC).replace(microsecond=0)
    status, headers, ticket = call(
        worker,
        "POST",
        f"/api/escrow/{escrow_id}/evidence",
        token(stack, seller),
        {"contentType": "application/pdf", "fileName": "tracking.pdf"},
    )
    assert status == 201, ticket
    assert headers["Content-Type"].startswith("application/json")
    assert set(ticket) == {"key", "uploadUrl", "method", "headers", "expiresAt"}
    assert ticket["key"].startswith(f"escrows/{escrow_id}/evidence/")
    assert ticket["key"].endswith(".pdf")
    assert ticket["method"] == "PUT"
    assert ticket["headers"] == {
        "Content-Type": "application/pdf",
        "x-amz-meta-file-name": "tracking.pdf",
    }
    expires_at = datetime.fromisoformat(ticket["expiresAt"])
    assert before + timedelta(seconds=PRESIGN_EXPIRY_S) <= expires_at
    assert expires_at <= datetime.now(UTC) + timedelta(seconds=PRESIGN_EXPIRY_S)

    body = b"%PDF-1.7\n" + uuid.uuid4().bytes * 100
    response = httpx.put(ticket["uploadUrl"], content=body, headers=ticket["headers"])
    assert response.status_code == 200, response.text
    stored = bucket.client.get_object(Bucket=bucket.bucket, Key=ticket["key"])
    assert stored["Body"].read() == body
    assert stored["ContentType"] == "application/pdf"

    # the same URL with another content type: S3 refuses, the object is unchanged
    response = httpx.put(
        ticket["uploadUrl"], content=b"<script>", headers={"Content-Type": "text/html"}
    )
    assert response.status_code == 403 and "SignatureDoesNotMatch" in response.text
    assert bucket.client.get_object(Bucket=bucket.bucket, Key=ticket["key"])["Body"].read() == body


def test_who_may_ask_for_upload_urls(stack: Stack, worker: WorkerProcess) -> None:
    escrow_id, buyer, seller = new_escrow(stack, worker)
    evidence, contract = f"/api/escrow/{escrow_id}/evidence", f"/api/escrow/{escrow_id}/contract"
    png, pdf = {"contentType": "image/png"}, {"contentType": "application/pdf"}
    cases: list[tuple[str, str | None, Any, int, str | None]] = [
        (evidence, token(stack, buyer), png, 201, None),
        (evidence, token(stack, seller), png, 201, None),
        (evidence, token(stack, "admin-1", Role.ADMIN), png, 201, None),
        (evidence, token(stack, "stranger"), png, 403, "NOT_AUTHORIZED"),
        (evidence, token(stack, "marketplace", Role.SERVICE), png, 403, "NOT_AUTHORIZED"),
        (evidence, None, png, 401, "UNAUTHENTICATED"),
        ("/api/escrow/no-such-escrow/evidence", token(stack, buyer), png, 404, "NOT_FOUND"),
        (evidence, token(stack, buyer), {"contentType": "text/html"}, 422, "VALIDATION_FAILED"),
        (evidence, token(stack, buyer), {"fileName": "x.png"}, 422, "VALIDATION_FAILED"),
        (evidence, token(stack, buyer), [png], 400, "INVALID_JSON"),
        (contract, token(stack, "marketplace", Role.SERVICE), pdf, 201, None),
        (contract, token(stack, "admin-1", Role.ADMIN), pdf, 201, None),
        (contract, token(stack, buyer), pdf, 403, "NOT_AUTHORIZED"),
        (contract, token(stack, "marketplace", Role.SERVICE), png, 422, "VALIDATION_FAILED"),
        (
            "/api/escrow/no-such-escrow/contract",
            token(stack, "marketplace", Role.SERVICE),
            pdf,
            404,
            "NOT_FOUND",
        ),
    ]
    for path, bearer, body, want_status, want_code in cases:
        status, headers, answer = call(worker, "POST", path, bearer, body)
        assert status == want_status, (path, body, answer)
        if want_code is None:
            prefix = "contract" if path == contract else "evidence"
            assert answer["key"].startswith(f"escrows/{escrow_id}/{prefix}/"), answer
        else:
            assert answer["code"] == want_code, (path, body, answer)
            assert headers["Content-Type"].startswith("application/problem+json")


def test_delivery_and_dispute_name_uploaded_evidence(
    stack: Stack, worker: WorkerProcess, bucket: EvidenceStore
) -> None:
    escrow_id, buyer, seller = new_escrow(stack, worker, funded=True)
    other_id, _, other_seller = new_escrow(stack, worker)
    deliver = f"/api/escrow/{escrow_id}/deliver"
    never = f"escrows/{escrow_id}/evidence/{uuid.uuid4().hex}.png"
    foreign = uploaded(stack, worker, other_id, other_seller)

    status, _, problem = call(
        worker, "POST", deliver, token(stack, seller), {"evidenceKeys": [never]}, WAIT
    )
    assert (status, problem["code"]) == (422, "EVIDENCE_NOT_FOUND"), problem
    assert never in problem["detail"]
    assert problem["errors"] == [
        {"field": "evidenceKeys.0", "message": f"{never!r} was not uploaded"}
    ]
    status, _, problem = call(
        worker, "POST", deliver, token(stack, seller), {"evidenceKeys": [foreign]}, WAIT
    )
    assert (status, problem["code"]) == (422, "EVIDENCE_KEY_INVALID"), problem
    assert foreign in problem["detail"]

    proof = uploaded(stack, worker, escrow_id, seller)
    status, _, escrow = call(
        worker,
        "POST",
        deliver,
        token(stack, seller),
        {"note": "shipped", "evidenceKeys": [proof]},
        WAIT,
    )
    assert (status, escrow["status"]) == (200, "DELIVERED"), escrow

    async def delivered_event() -> Any:
        status, _, body = call(
            worker, "GET", f"/api/escrow/{escrow_id}/events", token(stack, buyer)
        )
        if status != 200:
            return None
        return next((e for e in body["events"] if e["type"] == "EscrowDelivered"), None)

    event = asyncio.run(eventually(delivered_event, timeout_s=30))
    assert event is not None and event["data"]["evidenceKeys"] == [proof]

    complaint = uploaded(stack, worker, escrow_id, buyer)
    status, _, escrow = call(
        worker,
        "POST",
        f"/api/escrow/{escrow_id}/dispute",
        token(stack, buyer),
        {"reason": "not as described", "evidenceKeys": [complaint, proof]},
        WAIT,
    )
    assert (status, escrow["status"]) == (200, "DISPUTED"), escrow
    assert escrow["dispute"]["evidenceKeys"] == [complaint, proof]
    assert bucket.client.get_object(Bucket=bucket.bucket, Key=complaint)["Body"].read() == (
        b"\x89PNG proof"
    )
