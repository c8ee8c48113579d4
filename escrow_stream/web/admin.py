"""Operators' views (admin only).

``GET /api/admin/unmatched-funds?status=&escrowId=&limit=`` — money no escrow accepted
(SPEC §10), newest first: ``{"items": [{"fundsId", "provider", "providerObjectId",
"escrowId", "amount" (string of minor units), "currency", "reason", "detail", "status",
"senderAddress", "returnReference", "attempts", "lastError", "createdAt", "updatedAt",
"resolvedAt"}]}``.  ``status`` ∈ RETURNING, RETURNED, FROZEN, NEEDS_REVIEW (422 otherwise);
``limit`` 1 to 500, default 100.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import faust
from faust.web import Request, Response, View
from pydantic import BaseModel, ConfigDict

from escrow_stream.db import unmatched
from escrow_stream.db.pool import Database
from escrow_stream.db.unmatched import FundsStatus
from escrow_stream.web.auth import Role
from escrow_stream.web.gateway import Gateway, json_response
from escrow_stream.web.problems import Problem

LIMIT_DEFAULT = 100
LIMIT_MAX = 500


class UnmatchedFundsOut(BaseModel):
    """One row of ``unmatched_funds`` as operators read it."""

    model_config = ConfigDict(extra="forbid")
    fundsId: str
    provider: str
    providerObjectId: str
    escrowId: str | None
    amount: str
    currency: str
    reason: str
    detail: str | None
    status: FundsStatus
    senderAddress: str | None
    returnReference: str | None
    attempts: int
    lastError: str | None
    createdAt: str
    updatedAt: str
    resolvedAt: str | None


class UnmatchedFundsList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[UnmatchedFundsOut]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def funds_json(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif name == "amount":
            value = str(value)
        out[_camel(name)] = value
    return out


def _invalid(field: str, message: str) -> Problem:
    errors = [{"field": field, "message": message}]
    return Problem(422, "VALIDATION_FAILED", message, errors=errors)


def register(app: faust.App, gateway: Gateway, database: Database) -> None:
    @app.page("/api/admin/unmatched-funds")
    class UnmatchedFundsView(View):
        async def get(self, request: Request) -> Response:
            principal = await gateway.principal(request)
            if principal.role is not Role.ADMIN:
                raise Problem(403, "NOT_AUTHORIZED", "unmatched funds are for admins")
            query = request.query
            status: FundsStatus | None = None
            if query.get("status"):
                try:
                    status = FundsStatus(query["status"])
                except ValueError:
                    allowed = ", ".join(s.value for s in FundsStatus)
                    raise _invalid("status", f"status must be one of {allowed}") from None
            raw_limit = query.get("limit", str(LIMIT_DEFAULT))
            if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIMIT_MAX:
                raise _invalid("limit", f"limit must be 1 to {LIMIT_MAX}")
            pool = await database.pool()
            rows = await unmatched.listing(
                pool, status=status, escrow_id=query.get("escrowId") or None, limit=int(raw_limit)
            )
            listing = UnmatchedFundsList(items=[UnmatchedFundsOut(**funds_json(r)) for r in rows])
            return json_response(self, listing.model_dump(mode="json"))
