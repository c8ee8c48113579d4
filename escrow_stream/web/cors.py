"""Which browser origins may call the API, and with what (``CORS_ORIGINS``, else the origin
of ``WEB_APP_URL``)."""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp_cors

from escrow_stream.config import Settings

DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def allowed_origins(settings: Settings) -> tuple[str, ...]:
    """CORS_ORIGINS when it is set, else the web app's origin (scheme, host and port of
    WEB_APP_URL); none when WEB_APP_URL is no http(s) URL."""
    if settings.cors_origins:
        return settings.cors_origins
    parts = urlsplit(settings.web_app_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ()
    host = parts.netloc.rsplit("@", 1)[-1].lower()
    host = host.removesuffix(DEFAULT_PORTS[parts.scheme])  # as browsers send Origin
    return (f"{parts.scheme}://{host}",)


def cors_options(settings: Settings) -> dict[str, aiohttp_cors.ResourceOptions]:
    """CORS for :func:`allowed_origins` (browsers on other origins are refused)."""
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
        for origin in allowed_origins(settings)
    }
