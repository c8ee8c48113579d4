"""``API_URL`` and ``WEB_APP_URL`` without servers: problem ``type``s, OpenAPI ``servers``
and the CORS origin WEB_APP_URL gives when CORS_ORIGINS is unset."""

from __future__ import annotations

import pytest

from escrow_stream.config import load_settings
from escrow_stream.web.cors import allowed_origins, cors_options
from escrow_stream.web.openapi import openapi_document
from escrow_stream.web.problems import Problem, problem_type


def test_problem_type_is_an_absolute_uri_under_api_url() -> None:
    assert problem_type("https://api.example.com/", "INVALID_TRANSITION") == (
        "https://api.example.com/problems/invalid-transition"
    )
    body = Problem(409, "ALREADY_EXISTS", "taken").body("/api/escrow", "https://api.example.com")
    assert body["type"] == "https://api.example.com/problems/already-exists"
    assert body["instance"] == "/api/escrow"


def test_openapi_servers_only_when_an_api_url_is_given() -> None:
    assert openapi_document("https://api.example.com/")["servers"] == [
        {"url": "https://api.example.com"}
    ]
    assert "servers" not in openapi_document()


@pytest.mark.parametrize(
    ("web_app_url", "origins"),
    [
        ("https://App.Example.com/market/", ("https://app.example.com",)),
        ("https://app.example.com:443", ("https://app.example.com",)),
        ("http://localhost:5173", ("http://localhost:5173",)),
        ("https://app.example.com:8443/x", ("https://app.example.com:8443",)),
        ("app.example.com", ()),  # no scheme: no origin to allow
    ],
)
def test_without_cors_origins_the_web_apps_origin_is_allowed(
    web_app_url: str, origins: tuple[str, ...]
) -> None:
    settings = load_settings({"WEB_APP_URL": web_app_url})
    assert allowed_origins(settings) == origins
    assert tuple(cors_options(settings)) == origins


def test_cors_origins_when_set_replace_the_web_app() -> None:
    settings = load_settings(
        {"WEB_APP_URL": "https://app.example.com", "CORS_ORIGINS": "https://a.example"}
    )
    assert allowed_origins(settings) == ("https://a.example",)
