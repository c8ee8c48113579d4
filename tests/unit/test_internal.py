"""Worker-to-worker signatures and the client's address behind trusted proxies."""

from __future__ import annotations

import pytest

from escrow_stream.config import ConfigError, load_settings, parse_networks
from escrow_stream.web.internal import (
    INTERNAL_HEADER,
    INTERNAL_WINDOW_S,
    client_ip,
    internal_headers,
    is_internal,
)

SECRET = "unit-internal-secret"
NOW = 1_796_000_000.0
PATH = "/api/escrow/e-1/commands/c-1?x=1"


def signed(method: str = "GET", path: str = PATH, now: float = NOW) -> str:
    return internal_headers(SECRET, method, path, now)[INTERNAL_HEADER]


def test_a_signed_request_is_internal_within_the_window_only() -> None:
    assert is_internal(SECRET, signed(), "GET", PATH, NOW)
    assert is_internal(SECRET, signed(), "get", PATH, NOW + INTERNAL_WINDOW_S)
    assert not is_internal(SECRET, signed(), "GET", PATH, NOW + INTERNAL_WINDOW_S + 1)
    assert not is_internal(SECRET, signed(now=NOW + 120), "GET", PATH, NOW)  # from the future


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "not-a-signature",
        "abc.def",
        f"{int(NOW)}.{'0' * 64}",
        internal_headers("another-secret", "GET", PATH, NOW)[INTERNAL_HEADER],
        internal_headers(SECRET, "POST", PATH, NOW)[INTERNAL_HEADER],  # another method
        internal_headers(SECRET, "GET", "/api/escrow/e-2", NOW)[INTERNAL_HEADER],  # another path
    ],
)
def test_anything_else_is_an_ordinary_request(header: str | None) -> None:
    assert not is_internal(SECRET, header, "GET", PATH, NOW)


TRUSTED = parse_networks(["10.0.0.0/8", "192.168.1.7"])


@pytest.mark.parametrize(
    ("remote", "forwarded", "client"),
    [
        ("203.0.113.9", None, "203.0.113.9"),  # no proxy
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),  # an untrusted peer cannot name a client
        ("10.1.2.3", "198.51.100.4", "198.51.100.4"),  # the ingress names the client
        ("10.1.2.3", "6.6.6.6, 198.51.100.4", "198.51.100.4"),  # a forged hop on the left
        ("10.1.2.3", "198.51.100.4, 192.168.1.7", "198.51.100.4"),  # two trusted proxies
        ("10.1.2.3", None, "10.1.2.3"),  # a proxy with no header is the client itself
        (None, "198.51.100.4", "unknown"),
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    remote: str | None, forwarded: str | None, client: str
) -> None:
    assert client_ip(remote, forwarded, TRUSTED) == client


def test_nobody_is_trusted_by_default() -> None:
    assert client_ip("10.1.2.3", "198.51.100.4", ()) == "10.1.2.3"


def test_trusted_proxies_and_canonical_url_are_validated() -> None:
    assert load_settings({"TRUSTED_PROXIES": "10.0.0.0/8, ::1"}).trusted_proxies == (
        "10.0.0.0/8",
        "::1",
    )
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        load_settings({"TRUSTED_PROXIES": "10.0.0.0/33"})
    with pytest.raises(ConfigError, match="WEB_CANONICAL_URL"):
        load_settings({"WEB_CANONICAL_URL": "worker-0:3000"})


def test_canonical_url_never_advertises_a_wildcard_address() -> None:
    import socket

    assert load_settings({"PORT": "3100"}).canonical_url == f"http://{socket.gethostname()}:3100"
    assert load_settings({"WEB_HOST": "127.0.0.2"}).canonical_url == "http://127.0.0.2:3000"
    assert load_settings({"WEB_HOST": "::1"}).canonical_url == "http://[::1]:3000"
    given = {"WEB_CANONICAL_URL": "http://escrow-worker-1.escrow:3000/", "WEB_HOST": "0.0.0.0"}
    assert load_settings(given).canonical_url == "http://escrow-worker-1.escrow:3000"
