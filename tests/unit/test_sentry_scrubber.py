"""The Sentry scrubber (``escrow_stream/sentry.py``) on events shaped as the SDK builds them,
and the set-up: off without ``SENTRY_DSN``."""

from __future__ import annotations

import json
from typing import Any

from escrow_stream.config import load_settings
from escrow_stream.sentry import (
    FILTERED,
    init_sentry,
    scrub_breadcrumb,
    scrub_event,
    scrub_request,
    scrub_text,
)

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJidXllci0xIn0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
CARD = "4242424242424242"
WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
CLIENT_SECRET = "pi_3Abc123_secret_Xyz789"
STRIPE_SIGNATURE = "t=1700000000,v1=" + "ab" * 32
WEBHOOK_SECRET = "whsec_sentryunittestnotreal"


def _event() -> dict[str, Any]:
    return {
        "level": "error",
        "logentry": {"message": "charging %s failed", "params": [CARD]},
        "request": {
            "url": "http://api.example/api/escrow?token=abc",
            "method": "POST",
            "query_string": "access_token=qs-secret-1&limit=10",
            "headers": {
                "Authorization": f"Bearer {JWT}",
                "Cookie": "session=cookie-secret-1",
                "Stripe-Signature": STRIPE_SIGNATURE,
                "X-Custodian-Signature": "custodian-sig-1",
                "X-Escrow-Internal": "internal-sig-1",
                "Idempotency-Key": "idem-key-1",
                "Content-Type": "application/json",
                "X-Request-Id": "req-1",
            },
            "cookies": {"session": "cookie-secret-1"},
            "data": json.dumps({"card": CARD, "client_secret": CLIENT_SECRET}),
            "env": {"REMOTE_ADDR": "203.0.113.9"},
        },
        "user": {"ip_address": "203.0.113.9"},
        "exception": {
            "values": [
                {
                    "type": "ValueError",
                    "value": f"wallet {WALLET} refused for {CLIENT_SECRET} with {WEBHOOK_SECRET}",
                    "stacktrace": {
                        "frames": [
                            {
                                "function": "post",
                                "vars": {
                                    "api_key": "key-secret-1",
                                    "walletAddress": WALLET,
                                    "body": {"payment_method": {"card": {"number": CARD}}},
                                    "amount": "10000",
                                },
                            }
                        ]
                    },
                }
            ]
        },
        "extra": {"database_url": "postgresql://app:pw-secret-1@db/escrow", "escrow_id": "e-1"},
        "breadcrumbs": {
            "values": [{"message": f"GET https://x.example/cb?code=oauth-secret-1 {JWT}"}]
        },
    }


SECRETS = (
    JWT,
    CARD,
    WALLET,
    CLIENT_SECRET,
    WEBHOOK_SECRET,
    "abab" * 16,
    "qs-secret-1",
    "cookie-secret-1",
    "custodian-sig-1",
    "internal-sig-1",
    "idem-key-1",
    "key-secret-1",
    "pw-secret-1",
    "oauth-secret-1",
    "203.0.113.9",
)


def test_no_secret_survives_anywhere_in_the_event() -> None:
    sent = json.dumps(scrub_event(_event()))  # type: ignore[arg-type]
    assert [s for s in SECRETS if s in sent] == []


def test_what_is_kept_is_what_finds_the_error() -> None:
    event = dict(scrub_event(_event()))  # type: ignore[arg-type]
    request = event["request"]
    assert request["url"] == "http://api.example/api/escrow"
    assert request["method"] == "POST"
    assert request["query_string"] == "access_token=%5BFiltered%5D&limit=%5BFiltered%5D"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-Request-Id"] == "req-1"
    assert request["headers"]["Authorization"] == FILTERED
    assert request["headers"]["Stripe-Signature"] == FILTERED
    assert "data" not in request and "cookies" not in request and "env" not in request
    assert "user" not in event
    frame = event["exception"]["values"][0]["stacktrace"]["frames"][0]
    assert frame["function"] == "post"
    assert frame["vars"]["amount"] == "10000"
    assert frame["vars"]["body"]["payment_method"]["card"] == FILTERED
    assert event["extra"]["escrow_id"] == "e-1"
    assert event["exception"]["values"][0]["type"] == "ValueError"


def test_a_header_nobody_listed_is_filtered() -> None:
    request = scrub_request({"headers": {"X-New-Provider-Token": "t-1", "Accept": "*/*"}})
    assert request["headers"] == {"X-New-Provider-Token": FILTERED, "Accept": "*/*"}


def test_text_keeps_ordinary_numbers_and_filters_card_numbers() -> None:
    assert scrub_text("amount 10000 cents, escrow 1234567890123") == (
        "amount 10000 cents, escrow 1234567890123"  # 13 digits, not Luhn-valid
    )
    assert scrub_text("card 4242 4242 4242 4242 declined") == f"card {FILTERED} declined"
    assert scrub_text("postgresql://app:hunter2@db:5432/escrow") == (
        f"postgresql://app:{FILTERED}@db:5432/escrow"
    )
    assert scrub_text("Bearer abc.def") == f"Bearer {FILTERED}"
    assert scrub_text(f"sig {STRIPE_SIGNATURE}") == f"sig {FILTERED}"
    assert scrub_text("https://s3/b/k?X-Amz-Signature=abc&X-Amz-Expires=60") == (
        f"https://s3/b/k?X-Amz-Signature={FILTERED}&X-Amz-Expires=60"
    )


def test_breadcrumbs_lose_query_strings_and_payment_fields() -> None:
    crumb = scrub_breadcrumb(
        {
            "category": "httplib",
            "data": {
                "url": "https://user:pw@api.example/v1/accounts?secret=s-1",
                "http.query": "secret=s-1",
                "method": "POST",
            },
            "message": f"paid to {WALLET}",
        }
    )
    assert crumb["data"] == {"url": "https://api.example/v1/accounts", "method": "POST"}
    assert crumb["message"] == f"paid to {FILTERED}"


def test_sentry_stays_off_without_a_dsn() -> None:
    assert init_sentry(load_settings({}), "worker") is False
