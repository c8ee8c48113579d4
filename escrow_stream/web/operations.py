"""``GET /ready`` (processor, Kafka, PostgreSQL, Redis), ``GET /metrics``, ``GET /openapi.json``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from escrow_stream.web.openapi import openapi_document

READY_CHECK_TIMEOUT_S = 3.0
#: One round of checks serves every /ready call within this window (probes poll each second).
READY_CACHE_S = 1.0

Check = Callable[[], Awaitable[None]]

log = logging.getLogger(__name__)


class Readiness:
    """Runs the checks at most once per ``READY_CACHE_S``; answers ``ok`` / ``unavailable``
    per component and logs the error itself, which can name hosts, never in the body."""

    def __init__(self, checks: dict[str, Check], monotonic: Callable[[], float] = time.monotonic):
        self.checks = checks
        self.monotonic = monotonic
        self._last: tuple[float, dict[str, str]] | None = None
        self._running: asyncio.Task[dict[str, str]] | None = None

    async def results(self) -> dict[str, str]:
        now = self.monotonic()
        if self._last is not None and now - self._last[0] < READY_CACHE_S:
            return self._last[1]
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        results = await asyncio.shield(self._running)
        self._last = (self.monotonic(), results)
        return results

    async def _run(self) -> dict[str, str]:
        async def one(name: str, check: Check) -> str:
            try:
                await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
            except Exception as exc:
                log.warning("readiness: %s unavailable: %r", name, exc)
                return "unavailable"
            return "ok"

        names = list(self.checks)
        outcomes = await asyncio.gather(*(one(n, self.checks[n]) for n in names))
        return dict(zip(names, outcomes, strict=True))


def serve_metrics_alone(app: faust.App, port: int) -> None:
    """With METRICS_ENABLED=true, /metrics also on METRICS_PORT (scrapers off the public port)."""

    @app.task  # type: ignore[untyped-decorator]
    async def metrics_server() -> None:
        start_http_server(port)


def register(app: faust.App, readiness: Readiness, api_url: str | None = None) -> None:
    """``/ready``, ``/metrics`` and ``/openapi.json`` (its ``servers``: ``api_url``, API_URL)."""

    @app.page("/ready")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            results = await readiness.results()
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
                OpenApi.document = openapi_document(api_url)
            return self.json(OpenApi.document)
