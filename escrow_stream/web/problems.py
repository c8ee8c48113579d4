"""RFC 9457 problem details with the two members SPEC §4 adds: ``code`` and ``errors``.

A problem's ``type`` is an absolute URI under the API's public base URL (``API_URL``) naming
its code, e.g. ``https://api.example.com/problems/invalid-transition``: the same for every
occurrence of the code, so clients may match on either ``type`` or ``code``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from escrow_stream.domain import RejectionCode

PROBLEM_CONTENT_TYPE = "application/problem+json"

#: HTTP status of each rejection code of the domain (SPEC §4's status list).
REJECTION_STATUS: dict[RejectionCode, int] = {
    RejectionCode.NOT_AUTHORIZED: 403,
    RejectionCode.KYC_REQUIRED: 403,
    RejectionCode.FEATURE_DISABLED: 403,
    RejectionCode.NOT_FOUND: 404,
    RejectionCode.INVALID_TRANSITION: 409,
    RejectionCode.ALREADY_EXISTS: 409,
    RejectionCode.SETTLEMENT_PENDING: 409,
    RejectionCode.SETTLEMENT_MISMATCH: 409,
    RejectionCode.COMMAND_ID_REUSED: 409,
    RejectionCode.CHARGEBACK_OPEN: 409,
    RejectionCode.AMOUNT_MISMATCH: 409,
    RejectionCode.DEADLINE_NOT_REACHED: 409,
    RejectionCode.VALIDATION_FAILED: 422,
}

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def problem_type(api_url: str, code: str) -> str:
    """The ``type`` URI of ``code`` under ``api_url`` (``API_URL``)."""
    return f"{api_url.rstrip('/')}/problems/{code.lower().replace('_', '-')}"


class Problem(Exception):
    """Raised anywhere in a handler; the middleware turns it into the response."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def body(self, instance: str, api_url: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": problem_type(api_url, self.code),
            "title": TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            "code": self.code,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        return body

    def response(self, instance: str, api_url: str) -> web.Response:
        """The problem+json answer; ``api_url`` is the base of its ``type`` (``API_URL``)."""
        return web.Response(
            status=self.status,
            text=json.dumps(self.body(instance, api_url)),
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers,
        )


def rejection_problem(code: RejectionCode, message: str) -> Problem:
    return Problem(REJECTION_STATUS[code], code.value, message)
