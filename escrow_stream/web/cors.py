"""Which browser origins may call the API, and with what (``CORS_ORIGINS``)."""

from __future__ import annotations

import aiohttp_cors

from escrow_stream.config import Settings


def cors_options(settings: Settings) -> dict[str, aiohttp_cors.ResourceOptions]:
    """CORS for the origins in CORS_ORIGINS (none: browsers on other origins are refused)."""
    return {
        origin: aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
            allow_credentials=False,
            allow_headers=(
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Prefer",
                "X-Request-Id",
            ),
            expose_headers=(
                "X-Request-Id",
                "Retry-After",
                "Preference-Applied",
                "Idempotent-Replayed",
            ),
            allow_methods=("GET", "POST"),
            max_age=600,
        )
        for origin in settings.cors_origins
    }
