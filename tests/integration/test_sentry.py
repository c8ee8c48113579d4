"""Sentry on a live worker: a local HTTP server plays the DSN's host, real errors happen on
the real request path, and what arrives has the environment and release and no secret.

The error: the worker's database has no tables (a deployment that skipped ``db migrate``),
so a create over HTTP and a signed Stripe webhook each fail with a 500 after their
request, with its headers and body, has been read; so does the outbox relay, every second.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web

from escrow_stream import __version__
from escrow_stream.config import Settings
from tests.e2e.test_http_flow import create_body
from tests.e2e.test_http_reads import call, token
from tests.e2e.test_webhooks_stripe import event, sign
from tests.harness import deployment, drop_database
from tests.standins.server import ThreadedServer

pytestmark = pytest.mark.integration

ARRIVE_WAIT_S = 60.0


class Receiver(ThreadedServer):
    """The DSN's host: an aiohttp server on 127.0.0.1 keeping every envelope it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.paths: list[str] = []

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes the SDK's Content-Encoding (gzip)
        with self.lock:
            self.bodies.append(body)
            self.paths.append(request.path)
        return web.json_response({"id": uuid.uuid4().hex})

    def events(self) -> list[dict[str, Any]]:
        """The error events of every envelope received so far."""
        with self.lock:
            bodies = list(self.bodies)
        found = []
        for body in bodies:
            lines = body.split(b"\n")
            # envelope header, then (item header, payload) pairs
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if header.strip() and json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found

    def everything(self) -> bytes:
        with self.lock:
            return b"\n".join(self.bodies)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def unmigrated_database(stack_settings: Settings) -> Iterator[str]:
    """The URL of a database that exists and has no tables."""
    url = stack_settings.database_url.get_secret_value()
    name = f"sentry_{uuid.uuid4().hex[:10]}"

    async def run(sql_or_drop: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            if sql_or_drop == "create":
                await conn.execute(f'CREATE DATABASE "{name}"')
            else:
                await drop_database(conn, name)
        finally:
            await conn.close()

    asyncio.run(run("create"))
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    finally:
        asyncio.run(run("drop"))


def _wait_for(what: str, check: Any, timeout_s: float = ARRIVE_WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s}s")


def _request_event(events: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
    for e in events:
        if urlsplit(e.get("request", {}).get("url", "")).path == path:
            return e
    return None


def test_errors_reach_the_dsn_host_scrubbed(
    tmp_path: Path, receiver: Receiver, unmigrated_database: str
) -> None:
    run = uuid.uuid4().hex
    environment = f"sentry-test-{run[:8]}"
    webhook_secret = f"whsec_sentrytest{run}"
    cookie = f"cookie-value-{run}"
    idempotency_key = f"idem-key-{run}"
    query_token = f"querytoken{run}"
    card_number = "4242424242424242"
    client_secret = f"pi_{run[:12]}_secret_{run[12:]}"
    wallet = "0x52908400098527886E0F7030069857D2E4169EE7"
    with deployment(
        tmp_path,
        SENTRY_DSN=receiver.dsn,
        SENTRY_ENVIRONMENT=environment,
        DATABASE_URL=unmigrated_database,
        STRIPE_WEBHOOK_SECRET=webhook_secret,
    ) as (stack, worker):
        bearer = token(stack, f"buyer-{run[:8]}")
        status, _, problem = call(
            worker,
            "POST",
            f"/api/escrow?access_token={query_token}&limit=1",
            bearer,
            create_body(f"seller-{run[:8]}"),
            headers={"Cookie": f"session={cookie}", "Idempotency-Key": idempotency_key},
        )
        assert status == 500, problem
        body = event(
            "payment_intent.succeeded",
            {
                "id": f"pi_{run[:12]}",
                "object": "payment_intent",
                "amount": 10_000,
                "amount_received": 10_000,
                "currency": "usd",
                "client_secret": client_secret,
                "payment_method_details": {"card": {"number": card_number, "cvc": "123"}},
                "metadata": {"escrow_id": f"esc-{run[:8]}", "wallet_address": wallet},
            },
        )
        signature = sign(webhook_secret, body, int(time.time()))
        status, _, problem = call(
            worker,
            "POST",
            "/api/webhooks/stripe",
            body=json.loads(body),
            headers={"Stripe-Signature": signature},
        )
        assert status == 500, problem

        _wait_for(
            "events of both requests",
            lambda: all(
                _request_event(receiver.events(), p)
                for p in ("/api/escrow", "/api/webhooks/stripe")
            ),
        )
    # the worker has stopped (exit 0 checked by deployment()): what it flushed is in too
    events = receiver.events()
    create = _request_event(events, "/api/escrow")
    webhook = _request_event(events, "/api/webhooks/stripe")
    assert create is not None and webhook is not None
    for e in (create, webhook):
        assert e["environment"] == environment
        assert e["release"] == f"escrow-stream@{__version__}"
        assert e["tags"]["component"] == "worker"
        assert {"aiohttp", "asyncio", "logging"} <= set(e["sdk"]["integrations"])
        assert e["exception"]["values"], e  # the error itself, with its stack
        assert "data" not in e["request"] and "cookies" not in e["request"]
    assert create["request"]["headers"]["Authorization"] == "[Filtered]"
    assert create["request"]["headers"]["Idempotency-Key"] == "[Filtered]"
    assert create["request"]["query_string"] == "access_token=%5BFiltered%5D&limit=%5BFiltered%5D"
    assert webhook["request"]["headers"]["Stripe-Signature"] == "[Filtered]"
    assert any("outbox" in json.dumps(e.get("logentry", {})) for e in events), "relay errors"

    received = receiver.everything()
    assert all(p == "/api/1/envelope/" for p in receiver.paths)
    secrets = {
        "the bearer token": bearer,
        "the cookie": cookie,
        "the idempotency key": idempotency_key,
        "the query-string token": query_token,
        "the Stripe signature": signature.split("v1=")[1],
        "the webhook secret": webhook_secret,
        "the card number": card_number,
        "the client secret": client_secret,
        "the wallet address": wallet[2:],
        "the internal command secret": stack.secret(),
        "the JWT secret": stack.settings.jwt_secret.get_secret_value(),
    }
    leaked = [what for what, value in secrets.items() if value.encode() in received]
    assert leaked == [], f"sent to Sentry: {leaked}"
