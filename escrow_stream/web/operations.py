"""``GET /ready`` (Kafka, PostgreSQL, Redis), ``GET /metrics`` and ``GET /openapi.json``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from escrow_stream.web.openapi import openapi_document

READY_CHECK_TIMEOUT_S = 3.0

Check = Callable[[], Awaitable[None]]


async def run_checks(checks: dict[str, Check]) -> dict[str, str]:
    """``ok`` or the error of each check, each bounded by READY_CHECK_TIMEOUT_S."""

    async def one(check: Check) -> str:
        try:
            await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:300] or "failed"
        return "ok"

    results = await asyncio.gather(*(one(c) for c in checks.values()))
    return dict(zip(checks, results, strict=True))


def serve_metrics_alone(app: faust.App, port: int) -> None:
    """With METRICS_ENABLED=true, /metrics also on METRICS_PORT (scrapers off the public port)."""

    @app.task  # type: ignore[untyped-decorator]
    async def metrics_server() -> None:
        start_http_server(port)


def register(app: faust.App, checks: dict[str, Check]) -> None:
    @app.page("/ready")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            results = await run_checks(checks)
            ok = all(v == "ok" for v in results.values())
            body = {"status": "ready" if ok else "unavailable", "checks": results}
            return self.json(body, status=200 if ok else 503)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            # aiohttp wants the charset apart: "text/plain; version=0.0.4" + charset utf-8
            response = self.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])
            cast(Any, response).charset = "utf-8"
            return response

    @app.page("/openapi.json")
    class OpenApi(View):
        document: dict[str, Any] | None = None

        async def get(self, request: Request) -> Response:
            if OpenApi.document is None:
                OpenApi.document = openapi_document()
            return self.json(OpenApi.document)
