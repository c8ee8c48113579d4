"""What every view shares: who is calling, what they sent, and how the answer is written.

A request to a view, in order:

1. :meth:`Gateway.principal`: authenticate the bearer token (401) and count the caller
   against the per-user limit (429), once per request (not again when another worker
   forwards it here), with the per-IP count in the same Redis call.  Every view under
   ``/api/`` but the webhooks calls it before anything else (``web/ratelimit.py``).
2. :meth:`Gateway.body`: size (413), media type (415), JSON (400), the body model (422).
3. The view does its work and answers with :func:`json_response`, or raises a
   :class:`~escrow_stream.web.problems.Problem`.

Accepting commands is :mod:`escrow_stream.intake`; routed reads are
:mod:`escrow_stream.web.reads`; the escrow views are :mod:`escrow_stream.web.escrows`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, cast

from faust.web import Request, Response, View
from pydantic import BaseModel, ValidationError

from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.domain import Command, CommandInvalid, Escrow
from escrow_stream.domain.commands import validation_errors
from escrow_stream.messages import make_command
from escrow_stream.web.auth import Principal, Role, authenticate
from escrow_stream.web.internal import INTERNAL_REQUEST_KEY
from escrow_stream.web.problems import Problem
from escrow_stream.web.ratelimit import RateLimiter, deferred_ip
from escrow_stream.web.schemas import EmptyBody

WAIT_MAX_S = 30.0


class Gateway:
    """Steps 1-2 of the module docstring, built once by the composition root."""

    def __init__(self, settings: Settings, clock: Clock, limiter: RateLimiter) -> None:
        self.clock = clock
        self._limiter = limiter
        self._jwt_secret = settings.jwt_secret.get_secret_value()
        self._body_max_bytes = settings.http_body_max_bytes

    async def principal(self, request: Request) -> Principal:
        """The authenticated caller, counted against the per-user limit of escrow routes
        (once: not again when another worker forwards the caller's request here), in the
        same call as the per-IP count the middleware left for it (``web/ratelimit.py``)."""
        now = self.clock()
        mapping = cast(Any, request)  # aiohttp's request mapping
        noted = deferred_ip(mapping)
        try:
            principal = authenticate(request.headers.get("Authorization"), self._jwt_secret, now)
        except Problem:
            if noted is not None:  # counted for its IP alone; a 429 there wins over the 401
                await self._limiter.check("ip", noted.ip, self._limiter.per_ip, noted.now)
            raise
        if noted is not None:
            await self._limiter.check_ip_and_user(noted.ip, principal.sub, noted.now)
        elif not mapping.get(INTERNAL_REQUEST_KEY):
            await self._limiter.check_user(principal.sub, now)
        return principal

    async def body(self, request: Request, model: type[BaseModel]) -> tuple[BaseModel, bytes]:
        """The validated body and its raw bytes."""
        raw = await request.read()
        if len(raw) > self._body_max_bytes:
            raise Problem(
                413,
                "PAYLOAD_TOO_LARGE",
                f"the body is larger than {self._body_max_bytes} bytes",
            )
        if raw.strip() == b"" and model is EmptyBody:
            return EmptyBody(), raw
        if (
            request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            != "application/json"
        ):
            raise Problem(415, "UNSUPPORTED_MEDIA_TYPE", "send application/json")
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise Problem(400, "INVALID_JSON", f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Problem(400, "INVALID_JSON", "the body must be a JSON object")
        try:
            return model.model_validate(data, context={"wire": True}), raw
        except ValidationError as exc:
            raise Problem(
                422,
                "VALIDATION_FAILED",
                "the body is invalid",
                errors=validation_errors(exc),  # names the field of cross-field rules too
            ) from None


def build_command(
    actor: dict[str, str],
    type_: str,
    escrow_id: str,
    payload: dict[str, Any],
    command_id: str,
    now: datetime,
) -> Command:
    """A command from a view or a webhook (trusted producers: signed when enqueued); an
    invalid one is 422."""
    try:
        return make_command(actor, type_, escrow_id, payload, command_id, now)
    except CommandInvalid as exc:
        raise Problem(
            422,
            "VALIDATION_FAILED",
            str(exc),
            errors=[{"field": e["field"], "message": e["message"]} for e in exc.errors],
        ) from None


def authorization(request: Request) -> str:
    """The caller's ``Authorization`` header, for a read routed to another worker."""
    return request.headers.get("Authorization", "")


def json_response(
    view: View, body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return view.json(body, status=status, headers=headers)


def parse_wait(prefer: str | None) -> float | None:
    """Seconds from ``Prefer: wait=N`` (capped at 30), or None."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return max(0.0, min(WAIT_MAX_S, float(value)))
            except ValueError:
                raise Problem(400, "BAD_PREFER", "Prefer: wait=N needs a number") from None
    return None


def request_hash(method: str, path: str, body: bytes) -> str:
    """What makes a retry with the same Idempotency-Key the same request."""
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


def is_party(principal: Principal, escrow: Escrow | dict[str, Any]) -> bool:
    buyer = escrow["buyerId"] if isinstance(escrow, dict) else escrow.buyer_id
    seller = escrow["sellerId"] if isinstance(escrow, dict) else escrow.seller_id
    return principal.role is Role.USER and principal.sub in (buyer, seller)


def may_read(principal: Principal, escrow: Escrow | dict[str, Any]) -> bool:
    return principal.role is Role.ADMIN or is_party(principal, escrow)
