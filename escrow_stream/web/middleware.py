"""aiohttp middlewares of the web server: problem details, request ids, access metrics."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from escrow_stream.clock import Clock
from escrow_stream.config import Settings, parse_networks
from escrow_stream.logs import request_id_var, trace_id_var
from escrow_stream.metrics import HTTP_REQUESTS, HTTP_SECONDS, WORKER_READY
from escrow_stream.web.internal import (
    INTERNAL_HEADER,
    INTERNAL_REQUEST_KEY,
    client_ip,
    is_internal,
)
from escrow_stream.web.problems import Problem
from escrow_stream.web.ratelimit import (
    DEFERRED_IP_KEY,
    DeferredIp,
    RateLimiter,
    counts_user,
    deferred_ip,
)

log = logging.getLogger(__name__)

#: Errors that mean PostgreSQL (or another dependency) cannot be reached right now, not a
#: bug: the request is answered 503 with Retry-After, never 500.  The outbox write is the
#: acceptance, so a request that met one of these accepted nothing.
DEPENDENCY_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)
RETRY_AFTER_UNAVAILABLE_S = 5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def _trace_id(request: web.Request) -> str | None:
    """The W3C ``traceparent`` trace id, else ``X-Trace-Id``."""
    parts = request.headers.get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1]
    return request.headers.get("X-Trace-Id")


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


#: Probes are never rate limited: an orchestrator must always reach them.
UNLIMITED_PATHS = frozenset({"/health", "/ready", "/metrics"})
READY_PATH = "/ready"


def make_middleware(limiter: RateLimiter, clock: Clock, settings: Settings) -> Middleware:
    """Problem details, request ids, per-IP rate limit (``web/ratelimit.py``, step 1) and
    access metrics, in that order.

    Not limited: probes, webhooks (authenticated by their signatures, sent in bursts) and
    signed worker-to-worker requests (``web/internal.py``; marked for the per-user limit
    too).  The client's IP is read through ``TRUSTED_PROXIES``."""
    secret = settings.internal_command_secret.get_secret_value()
    trusted = parse_networks(settings.trusted_proxies)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        async def limited(request: web.Request) -> web.StreamResponse:
            now = clock()
            signed = request.headers.get(INTERNAL_HEADER)
            if signed and is_internal(
                secret, signed, request.method, request.raw_path, now.timestamp()
            ):
                request[INTERNAL_REQUEST_KEY] = True
            elif request.path not in UNLIMITED_PATHS and not request.path.startswith(
                "/api/webhooks/"
            ):
                ip = client_ip(request.remote, request.headers.get("X-Forwarded-For"), trusted)
                if counts_user(request):  # the gateway counts IP and user in one call
                    request[DEFERRED_IP_KEY] = DeferredIp(ip, now)
                    try:
                        return await handler(request)
                    finally:
                        left = deferred_ip(request)  # the view never authenticated
                        if left is not None:
                            await limiter.count_ip_late(left)
                await limiter.check_ip(ip, now)
            return await handler(request)

        return await problems_and_request_ids(request, limited, settings.api_url)

    return middleware


async def problems_and_request_ids(
    request: web.Request, handler: Handler, api_url: str
) -> web.StreamResponse:
    """Every error becomes a problem+json (its ``type`` under ``api_url``: API_URL); every
    response carries X-Request-Id."""
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    request_id_var.set(request_id)  # each aiohttp request runs in a task of its own
    trace_id_var.set(_trace_id(request))
    started = time.perf_counter()
    route = _route(request)
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem.response(request.path, api_url)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}.get(
            exc.status, "HTTP_ERROR"
        )
        response = Problem(exc.status, code, exc.reason).response(request.path, api_url)
    except DEPENDENCY_UNAVAILABLE as exc:
        log.warning(
            "%s %s: a dependency is unavailable (request %s): %r",
            request.method,
            request.path,
            request_id,
            exc,
        )
        response = Problem(
            503,
            "DEPENDENCY_UNAVAILABLE",
            "a service this request needs is unavailable; nothing was accepted, retry",
            headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
        ).response(request.path, api_url)
    except Exception:
        log.exception(
            "unhandled error on %s %s (request %s)", request.method, request.path, request_id
        )
        response = Problem(500, "INTERNAL", "internal error; quote the request id").response(
            request.path, api_url
        )
    response.headers["X-Request-Id"] = request_id
    log.info("%s %s -> %s", request.method, request.path, response.status)
    HTTP_REQUESTS.labels(request.method, route, str(response.status)).inc()
    HTTP_SECONDS.labels(request.method, route).observe(time.perf_counter() - started)
    if route == READY_PATH:  # the readiness probe's last answer, for the alert rules
        WORKER_READY.set(1 if response.status == 200 else 0)
    return response
