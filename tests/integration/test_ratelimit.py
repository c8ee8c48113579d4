"""Rate limits through the web server's middlewares and the gateway, on the local Redis (and
in memory): per IP and per user per minute, in one counter call per request, failing open."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from escrow_stream.config import Settings, load_settings
from escrow_stream.redisconn import redis_client
from escrow_stream.web.auth import Role, issue_token
from escrow_stream.web.gateway import Gateway
from escrow_stream.web.middleware import make_middleware
from escrow_stream.web.ratelimit import (
    WINDOW_S,
    Counter,
    MemoryCounter,
    RateLimiter,
    RedisCounter,
)
from tests.harness import TEST_ENV_DEFAULTS, free_port, stack_environ

pytestmark = pytest.mark.integration

PER_IP = 5
PER_USER = 3
#: The gateway's and the middleware's clock: every request of a test in one window.
NOW = datetime(2026, 11, 30, 12, 0, 10, tzinfo=UTC)


class CountingRedis(redis.asyncio.Redis):
    """The real client, counting the commands it sends (a pipeline's are not counted)."""

    calls = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.calls += 1
        return await super().execute_command(*args, **options)


@pytest.fixture
async def client() -> AsyncIterator[CountingRedis]:
    client = CountingRedis.from_url(TEST_ENV_DEFAULTS["REDIS_URL"])
    yield client
    await client.aclose()


Serve = Callable[[Counter], Any]


@pytest.fixture
async def served(stack_settings: Settings) -> AsyncIterator[Callable[[Counter], Any]]:
    """``await served(counter)``: a test client of an app with the worker's middlewares, an
    API view that authenticates through the gateway, and a public page; ``ran`` counts the
    public page's runs."""
    clients: list[TestClient[Any, Any]] = []
    ran: list[int] = []

    async def serve(counter: Counter) -> TestClient[Any, Any]:
        limiter = RateLimiter(counter, PER_IP, PER_USER)
        app = web.Application(middlewares=[make_middleware(limiter, lambda: NOW, stack_settings)])
        gateway = Gateway(stack_settings, lambda: NOW, limiter)

        async def api(request: web.Request) -> web.Response:
            principal = await gateway.principal(request)
            return web.json_response({"sub": principal.sub})

        async def public(request: web.Request) -> web.Response:
            ran.append(1)
            return web.json_response({})

        app.router.add_get("/api/things", api)
        app.router.add_get("/openapi.json", public)
        test_client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await test_client.start_server()
        clients.append(test_client)
        test_client.ran = ran  # type: ignore[attr-defined]
        return test_client

    yield serve
    for test_client in clients:
        await test_client.close()


def bearer(settings: Settings, sub: str) -> dict[str, str]:
    token = issue_token(
        settings.jwt_secret.get_secret_value(), sub, Role.USER, NOW, timedelta(hours=1)
    )
    return {"Authorization": f"Bearer {token}"}


def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def counters(client: redis.asyncio.Redis) -> dict[str, Callable[[], Counter]]:
    return {"redis": lambda: RedisCounter(client, namespace()), "memory": MemoryCounter}


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_per_ip_and_per_user_limits(
    kind: str, client: CountingRedis, served: Any, stack_settings: Settings
) -> None:
    api = await served(counters(client)[kind]())
    user = bearer(stack_settings, "u1")
    answers = [await api.get("/api/things", headers=user) for _ in range(PER_USER + 1)]
    assert [a.status for a in answers] == [200, 200, 200, 429]
    problem = await answers[-1].json()
    assert problem["code"] == "RATE_LIMITED" and "this user" in problem["detail"]
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= WINDOW_S - 10
    # the IP has 4 of its 5: one more user passes, the next request is over for the IP
    assert (await api.get("/api/things", headers=bearer(stack_settings, "u2"))).status == 200
    refused = await api.get("/api/things", headers=bearer(stack_settings, "u3"))
    assert refused.status == 429 and "this ip" in (await refused.json())["detail"]
    # a 429 for the IP wins over a missing token, and pages outside the API are limited
    # before they run
    assert (await api.get("/api/things")).status == 429
    assert (await api.get("/openapi.json")).status == 429
    assert api.ran == []
    # probes never are
    assert (await api.get("/health")).status == 404


async def test_a_request_refused_for_its_ip_is_not_counted_for_its_user(
    client: CountingRedis, served: Any, stack_settings: Settings
) -> None:
    api = await served(RedisCounter(client, namespace()))
    for _ in range(PER_IP):
        assert (await api.get("/openapi.json")).status == 200
    # over for the IP: u1's requests are not counted against u1
    for _ in range(PER_USER + 2):
        assert (await api.get("/api/things", headers=bearer(stack_settings, "u1"))).status == 429
    assert api.ran == [1] * PER_IP


async def test_one_redis_call_per_request(
    client: CountingRedis, served: Any, stack_settings: Settings
) -> None:
    api = await served(RedisCounter(client, namespace()))
    user = bearer(stack_settings, "u1")
    for path, headers in [("/api/things", user), ("/api/things", {}), ("/openapi.json", {})]:
        before = client.calls
        await api.get(path, headers=headers)
        assert client.calls - before == 1, path


async def test_limits_fail_open_without_redis(served: Any, stack_settings: Settings) -> None:
    # the worker's own client (fail-fast timeouts and retries), to a port nobody listens on
    nowhere = redis_client(
        load_settings(stack_environ(REDIS_URL=f"redis://127.0.0.1:{free_port()}"))
    )
    assert nowhere is not None
    try:
        api = await served(RedisCounter(nowhere, namespace()))
        user = bearer(stack_settings, "u1")
        statuses = [(await api.get("/api/things", headers=user)).status for _ in range(PER_IP * 2)]
        assert statuses == [200] * (PER_IP * 2)
    finally:
        await nowhere.aclose()
