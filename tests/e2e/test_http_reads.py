"""The HTTP API's reads, auth and operations endpoints on a live worker."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role, issue_token
from tests.builders import wire_command
from tests.harness import Stack, WorkerProcess, eventually, free_port

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]  # the test database outlives runs: ids of this run only
BUYER = {"id": f"http-buyer-{RUN}", "role": "user"}
SELLER = {"id": f"http-seller-{RUN}", "role": "user"}
SYSTEM = {"id": "payments-agent", "role": "system"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings) -> Iterator[Stack]:
    stack = Stack.create(
        tmp_path_factory.mktemp("http"),
        REDIS_URL="redis://127.0.0.1:6379/15",
        METRICS_ENABLED="true",
        METRICS_PORT=str(free_port()),
    )
    asyncio.run(stack.create_topics())
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[WorkerProcess]:
    worker = stack.worker("api").start()
    worker.wait_healthy()
    yield worker
    assert worker.stop() == 0, worker.log_tail()


def token(stack: Stack, sub: str, role: Role = Role.USER, ttl_s: int = 600) -> str:
    secret = stack.settings.jwt_secret.get_secret_value()
    return issue_token(secret, sub, role, datetime.now(UTC), timedelta(seconds=ttl_s))


def call(
    worker: WorkerProcess,
    method: str,
    path: str,
    bearer: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{worker.base_url}{path}", data=data, method=method)
    if bearer is not None:
        request.add_header("Authorization", f"Bearer {bearer}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=35) as response:
            raw = response.read()
            return response.status, dict(response.headers), _decode(raw)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), _decode(err.read())


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode()


def escrow_when(
    stack: Stack,
    worker: WorkerProcess,
    user: str,
    escrow_id: str,
    ready: Callable[[dict[str, Any]], Any],
    timeout_s: float = 30,
) -> dict[str, Any] | None:
    """GET the escrow as ``user`` until ``ready(body)`` holds (bounded); the body or None."""

    def check() -> dict[str, Any] | None:
        status, _, body = call(worker, "GET", f"/api/escrow/{escrow_id}", token(stack, user))
        return body if status == 200 and ready(body) else None

    result: dict[str, Any] | None = asyncio.run(eventually(check, timeout_s=timeout_s))
    return result


@pytest.fixture(scope="module")
def escrow_id(stack: Stack, worker: WorkerProcess) -> str:
    e = f"esc-{uuid.uuid4().hex[:12]}"
    create = wire_command(
        "CreateEscrow",
        e,
        BUYER,
        {
            "offerId": "o-1",
            "contractId": "c-1",
            "buyerId": BUYER["id"],
            "sellerId": SELLER["id"],
            "rail": "STRIPE",
            "amount": "10000",
            "currency": "USD",
        },
    )
    asyncio.run(stack.send([create]))
    asyncio.run(stack.events(lambda es: any(x["escrowId"] == e for x in es)))
    return e


def test_health_ready_metrics_openapi(stack: Stack, worker: WorkerProcess) -> None:
    status, _, body = call(worker, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    # ready once the worker has joined its group and recovered its tables (bounded wait)
    ready = asyncio.run(eventually(lambda: call(worker, "GET", "/ready")[0] == 200))
    status, _, body = call(worker, "GET", "/ready")
    assert ready and status == 200, body
    assert body == {
        "status": "ready",
        "checks": {"processor": "ok", "kafka": "ok", "postgres": "ok", "redis": "ok"},
    }
    status, headers, text = call(worker, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert "escrow_http_requests_total" in text

    def metrics_alone() -> bytes | None:
        url = f"http://127.0.0.1:{stack.settings.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as alone:
                return bytes(alone.read()) if alone.status == 200 else None
        except OSError:
            return None  # the worker starts its tasks after the web server

    alone = asyncio.run(eventually(metrics_alone, timeout_s=30))
    assert alone is not None and b"escrow_commands_total" in alone  # same registry, own port
    status, _, doc = call(worker, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"
    assert {"/api/escrow", "/api/escrow/{escrow_id}", "/api/escrow/{escrow_id}/release"} <= set(
        doc["paths"]
    )
    assert "CreateEscrowBody" in doc["components"]["schemas"]


def test_get_escrow_authorization(stack: Stack, worker: WorkerProcess, escrow_id: str) -> None:
    path = f"/api/escrow/{escrow_id}"
    secret = stack.settings.jwt_secret.get_secret_value()
    forged = issue_token("x" * 64, BUYER["id"], Role.USER, datetime.now(UTC), timedelta(hours=1))
    expired = issue_token(
        secret, BUYER["id"], Role.USER, datetime.now(UTC) - timedelta(hours=2), timedelta(hours=1)
    )
    exp = int((datetime.now(UTC) + timedelta(hours=1)).timestamp())

    def odd(**claims: Any) -> str:  # well signed, claims of the wrong types
        return jwt.encode({"sub": BUYER["id"], "role": "user", "exp": exp, **claims}, secret)

    cases = {
        "no token": (None, 401, "UNAUTHENTICATED"),
        "forged": (forged, 401, "INVALID_TOKEN"),
        "role is a list": (odd(role=["user", "admin"]), 401, "INVALID_TOKEN"),
        "role is an object": (odd(role={"admin": True}), 401, "INVALID_TOKEN"),
        "sub is a number": (odd(sub=42), 401, "INVALID_TOKEN"),
        "exp is a string": (odd(exp="tomorrow"), 401, "INVALID_TOKEN"),
        "expired": (expired, 401, "TOKEN_EXPIRED"),
        "other user": (token(stack, "someone-else"), 403, "NOT_AUTHORIZED"),
        "service": (token(stack, "marketplace", Role.SERVICE), 403, "NOT_AUTHORIZED"),
    }
    for name, (bearer, want_status, want_code) in cases.items():
        status, headers, body = call(worker, "GET", path, bearer)
        assert (status, body["code"]) == (want_status, want_code), name
        assert headers["Content-Type"].startswith("application/problem+json"), name
        assert body["status"] == want_status and body["instance"] == path, name
    for bearer in (
        token(stack, BUYER["id"]),
        token(stack, SELLER["id"]),
        token(stack, "admin-1", Role.ADMIN),
    ):
        status, headers, body = call(worker, "GET", path, bearer)
        assert status == 200, body
        assert body["escrowId"] == escrow_id and body["status"] == "AWAIT_FUNDS"
        assert "recentCommands" not in body
        assert headers["X-Request-Id"]
    status, _, body = call(
        worker, "GET", "/api/escrow/does-not-exist", token(stack, "admin-1", Role.ADMIN)
    )
    assert (status, body["code"]) == (404, "NOT_FOUND")


def test_list_and_history_from_the_mirror(
    stack: Stack, worker: WorkerProcess, escrow_id: str
) -> None:
    buyer = token(stack, BUYER["id"])

    async def listed() -> Any:
        status, _, body = call(worker, "GET", "/api/escrow?status=AWAIT_FUNDS&limit=1", buyer)
        return body if status == 200 and body["items"] else None

    page = asyncio.run(eventually(listed, timeout_s=30))
    assert page is not None
    assert [item["escrowId"] for item in page["items"]] == [escrow_id]
    status, _, body = call(worker, "GET", "/api/escrow", token(stack, "nobody"))
    assert status == 200 and body == {"items": [], "nextCursor": None}
    status, _, body = call(worker, "GET", "/api/escrow?cursor=!!", buyer)
    assert (status, body["code"]) == (400, "INVALID_CURSOR")

    async def mirrored_history() -> Any:
        status, _, body = call(worker, "GET", f"/api/escrow/{escrow_id}/events", buyer)
        return body if status == 200 else None

    history = asyncio.run(eventually(mirrored_history, timeout_s=30))
    assert history is not None
    assert [e["type"] for e in history["events"]] == ["EscrowCreated"]
    status, _, body = call(
        worker, "GET", f"/api/escrow/{escrow_id}/events", token(stack, "someone-else")
    )
    assert status == 403


def test_json_logs_carry_request_and_trace_ids(stack: Stack, worker: WorkerProcess) -> None:
    request_id = f"req-{uuid.uuid4().hex[:8]}"
    trace_id = uuid.uuid4().hex
    headers = {"X-Request-Id": request_id, "traceparent": f"00-{trace_id}-{'1' * 16}-01"}
    status, response_headers, _ = call(
        worker, "GET", "/api/escrow", token(stack, "x"), headers=headers
    )
    assert status == 200 and response_headers["X-Request-Id"] == request_id

    def logged() -> dict[str, Any] | None:
        for line in worker.log_path.read_text().splitlines():
            if request_id in line and line.startswith("{"):
                return dict(json.loads(line))
        return None

    line = asyncio.run(eventually(logged, timeout_s=10))
    assert line is not None
    assert (line["requestId"], line["traceId"]) == (request_id, trace_id)
    assert line["msg"] == "GET /api/escrow -> 200"


def test_a_command_without_an_escrow_is_seen_by_its_sender_and_admins_only(
    stack: Stack, worker: WorkerProcess
) -> None:
    missing = f"never-created-{uuid.uuid4().hex[:8]}"
    release = wire_command("ReleaseFunds", missing, BUYER)  # refused NOT_FOUND, recorded
    asyncio.run(stack.send([release]))
    asyncio.run(stack.rejections(lambda rs: any(r["escrowId"] == missing for r in rs)))
    path = f"/api/escrow/{missing}/commands/{release['commandId']}"
    for bearer in (token(stack, BUYER["id"]), token(stack, "admin-1", Role.ADMIN)):
        status, _, body = call(worker, "GET", path, bearer)
        assert status == 200, body
        assert (body["status"], body["code"]) == ("REJECTED", "NOT_FOUND")
    for bearer in (token(stack, SELLER["id"]), token(stack, "someone-else")):
        status, _, body = call(worker, "GET", path, bearer)
        assert (status, body["code"]) == (404, "NOT_FOUND"), body
    unknown = f"/api/escrow/{missing}/commands/cmd-unknown"
    status, _, body = call(worker, "GET", unknown, token(stack, BUYER["id"]))
    assert (status, body["code"]) == (404, "NOT_FOUND")
