"""``API_URL`` and ``WEB_APP_URL`` on a live worker, used for what they mean: the API's public
base in problem ``type``s and OpenAPI ``servers``; the web app's in Stripe onboarding's
return/refresh URLs and, with no ``CORS_ORIGINS``, as the one CORS origin."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from escrow_stream.config import Settings
from tests.e2e.test_http_reads import call, token
from tests.harness import Stack, WorkerProcess, deployment
from tests.standins.stripe_proxy import StripeProxy

pytestmark = pytest.mark.integration

API_URL = "https://api.escrow-test.example"
WEB_APP = "https://app.escrow-test.example"


class RecordingStripe(StripeProxy):
    """stripe-mock behind the stand-in proxy, keeping the form each request sent."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        form = dict(parse_qsl((await request.read()).decode(), keep_blank_values=True))
        with self.lock:
            self.forms.append((request.path, form))
        return await super()._handle(request)


@pytest.fixture(scope="module")
def stripe() -> Iterator[RecordingStripe]:
    proxy = RecordingStripe().start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings, stripe: RecordingStripe
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(
        tmp_path_factory.mktemp("urls"),
        API_URL=f"{API_URL}/",  # a trailing slash is not doubled
        WEB_APP_URL=f"{WEB_APP}/market",
        STRIPE_API_BASE=stripe.url,
    ) as running:
        yield running


def test_problem_types_are_under_api_url(worker: tuple[Stack, WorkerProcess]) -> None:
    _, process = worker
    status, headers, problem = call(process, "GET", "/api/escrow")
    assert status == 401
    assert headers["Content-Type"].startswith("application/problem+json")
    assert problem["type"] == f"{API_URL}/problems/{problem['code'].lower().replace('_', '-')}"
    status, _, problem = call(process, "GET", "/no/such/route")
    assert (status, problem["type"]) == (404, f"{API_URL}/problems/not-found")


def test_openapi_servers_name_api_url(worker: tuple[Stack, WorkerProcess]) -> None:
    _, process = worker
    status, _, document = call(process, "GET", "/openapi.json")
    assert status == 200
    assert document["servers"] == [{"url": API_URL}]


def test_stripe_onboarding_returns_to_the_web_app(
    worker: tuple[Stack, WorkerProcess], stripe: RecordingStripe
) -> None:
    stack, process = worker
    seller = f"url-seller-{uuid.uuid4().hex[:8]}"
    status, _, account = call(process, "POST", "/api/payout-accounts/stripe", token(stack, seller))
    assert status == 201, account
    links = [
        form
        for path, form in stripe.forms
        if path == "/v1/account_links" and form.get("account") == account["accountId"]
    ]
    assert len(links) == 1, stripe.forms
    account_q = f"account={account['accountId']}"
    assert links[0]["return_url"] == f"{WEB_APP}/market/payouts/stripe/return?{account_q}"
    assert links[0]["refresh_url"] == f"{WEB_APP}/market/payouts/stripe/refresh?{account_q}"


def test_without_cors_origins_the_web_app_is_the_one_origin(
    worker: tuple[Stack, WorkerProcess],
) -> None:
    _, process = worker
    preflight = {
        "Origin": WEB_APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    status, headers, _ = call(process, "OPTIONS", "/api/escrow", headers=preflight)
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == WEB_APP
    other = {**preflight, "Origin": "https://elsewhere.example"}
    _, headers, _ = call(process, "OPTIONS", "/api/escrow", headers=other)
    assert "Access-Control-Allow-Origin" not in headers
