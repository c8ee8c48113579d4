"""Error reporting to Sentry: on only when ``SENTRY_DSN`` is set, and nothing secret leaves.

Steps, in order:

1. :func:`init_sentry`, once, when a long-running command starts (``worker``,
   ``outbox-publisher``) and before the app is built: the aiohttp integration (the request
   being handled is attached to its errors) and the default logging one (ERROR records become
   events, INFO and above breadcrumbs); the integrations the SDK would switch on by itself
   for installed libraries (Redis, asyncpg, httpx, boto3 …) stay off.  ``environment`` is
   ``SENTRY_ENVIRONMENT`` (unset: ``NODE_ENV``), ``release`` is
   ``escrow-stream@{package version}``, ``send_default_pii`` is off, request bodies are never
   read (``max_request_body_size="never"``) and frames carry no local variables (they hold
   request bodies, tokens and keys).
2. :func:`instrument_event_loop`, from inside the running loop: the asyncio integration
   (exceptions raised in tasks) patches a loop that runs, so it cannot be set up in step 1.
3. Every event passes :func:`scrub_event` and every breadcrumb :func:`scrub_breadcrumb` last,
   just before it is sent:

   * the request keeps its method and its URL without the query; its body, cookies and
     client address are dropped, each query value is filtered (the names stay), and every
     header outside :data:`HEADERS_KEPT` is filtered (``Authorization``, ``Cookie``,
     ``Stripe-Signature``, ``X-Custodian-Signature``, ``X-Escrow-Internal``,
     ``Idempotency-Key`` …): an allowlist, so a header added later is filtered too;
   * anywhere in the event (messages, exception values, breadcrumbs, extra, contexts, tags),
     a value whose key names a secret or a payment field (:data:`SENSITIVE_KEY_PARTS`:
     ``card``, ``client_secret``, ``walletAddress``, ``api_key``, ``idempotency_key`` …) is
     filtered, and inside every string what looks like a bearer token, a JWT, a Stripe key
     or client secret, a webhook signature, a card number (Luhn-valid), a wallet address,
     a URL's password or a token in a query string is filtered.

Idempotency keys are filtered too: clients often build them from order or payment ids, and
the request id (``X-Request-Id``, kept) is what ties a Sentry event to the logs.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from escrow_stream import __version__
from escrow_stream.config import Settings

if TYPE_CHECKING:
    from sentry_sdk.types import Breadcrumb, BreadcrumbHint, Event, Hint

FILTERED = "[Filtered]"

#: Request headers sent as they are; every other header's value is filtered.
HEADERS_KEPT = frozenset(
    {
        "accept",
        "accept-encoding",
        "content-length",
        "content-type",
        "host",
        "prefer",
        "traceparent",
        "user-agent",
        "x-request-id",
        "x-trace-id",
    }
)

#: A key containing one of these (lowercase, without ``-`` and ``_``) has its value filtered.
SENSITIVE_KEY_PARTS = (
    "authorization",
    "cookie",
    "signature",
    "secret",
    "password",
    "passwd",
    "token",
    "jwt",
    "apikey",
    "privatekey",
    "credential",
    "session",
    "idempotencykey",
    "dsn",
    "databaseurl",
    "redisurl",
    # payment fields
    "card",
    "cvc",
    "cvv",
    "expmonth",
    "expyear",
    "iban",
    "accountnumber",
    "routingnumber",
    "bankaccount",
    "wallet",
    "address",
    "destination",
)

#: Query parameters are filtered whatever their name; these names also inside free text.
_QUERY_SECRET = re.compile(
    r"([?&;](?:[\w.-]*(?:token|secret|signature|sig|key|password|code|credential)"
    r"[\w.-]*)=)[^&#\s\"']+",
    re.IGNORECASE,
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(Bearer|Basic)\s+[\w.~+/=-]+", re.IGNORECASE), rf"\1 {FILTERED}"),
    (re.compile(r"\beyJ[\w-]*\.[\w-]+\.[\w-]*"), FILTERED),  # a JWT
    (re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_\w+"), FILTERED),  # Stripe API keys
    (re.compile(r"\bwhsec_\w+"), FILTERED),  # webhook signing secrets
    (re.compile(r"\b\w+_secret_\w+"), FILTERED),  # Stripe client secrets: pi_…_secret_…
    (re.compile(r"\b(t=\d+,)?v[01]=[0-9a-f]{16,}(,v[01]=[0-9a-f]{16,})*"), FILTERED),
    (re.compile(r"\b0x[0-9a-fA-F]{40}\b"), FILTERED),  # wallet addresses
    (re.compile(r"(://[^:/@\s]*:)[^@/\s]+@"), rf"\1{FILTERED}@"),  # a URL's password
    (_QUERY_SECRET, rf"\1{FILTERED}"),
)
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")


def init_sentry(settings: Settings, component: str) -> bool:
    """Step 1: turn Sentry on when ``SENTRY_DSN`` is set; whether it is on.  Called again in
    the same process, it leaves the first set-up as it is."""
    if settings.sentry_dsn is None:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.aiohttp import AioHttpIntegration

    if sentry_sdk.get_client().is_active():
        return True
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.sentry_environment or settings.node_env.value,
        release=f"escrow-stream@{__version__}",
        integrations=[AioHttpIntegration()],
        auto_enabling_integrations=False,
        send_default_pii=False,
        max_request_body_size="never",
        include_local_variables=False,
        before_send=scrub_event,
        before_breadcrumb=scrub_breadcrumb,
    )
    sentry_sdk.set_tag("component", component)
    return True


def instrument_event_loop() -> None:
    """Step 2: the asyncio integration on the running loop (nothing when Sentry is off)."""
    if "sentry_sdk" not in sys.modules:
        return  # step 1 never turned it on
    import sentry_sdk
    from sentry_sdk.integrations.asyncio import enable_asyncio_integration

    if sentry_sdk.get_client().is_active():
        enable_asyncio_integration(task_spans=False)  # no tracing: errors only


def scrub_event(event: Event, hint: Hint | None = None) -> Event:
    """Step 3 for an event: the request reduced as the module says, then every value."""
    raw: dict[str, Any] = dict(event)
    if isinstance(raw.get("request"), Mapping):
        raw["request"] = scrub_request(raw["request"])
    raw.pop("user", None)
    return cast("Event", _scrub(raw))


def scrub_breadcrumb(crumb: Breadcrumb, hint: BreadcrumbHint | None = None) -> Breadcrumb:
    """Step 3 for a breadcrumb (a log line, an HTTP call): the same rules as events."""
    raw: dict[str, Any] = dict(crumb)
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("url"), str):
        data["url"] = _url_without_query(data["url"])
        data.pop("http.query", None)
    return cast("Breadcrumb", _scrub(raw))


def scrub_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """What of a request may be sent: method, URL without query, query names, kept headers."""
    out: dict[str, Any] = {}
    if "method" in request:
        out["method"] = request["method"]
    if isinstance(request.get("url"), str):
        out["url"] = _url_without_query(request["url"])
    query = request.get("query_string")
    if isinstance(query, str) and query:
        out["query_string"] = urlencode(
            [(name, FILTERED) for name, _ in parse_qsl(query, keep_blank_values=True)]
        )
    headers = request.get("headers")
    if isinstance(headers, Mapping):
        out["headers"] = {
            name: value if str(name).lower() in HEADERS_KEPT else FILTERED
            for name, value in headers.items()
        }
    return out


def scrub_text(text: str) -> str:
    """Every secret-looking part of ``text`` filtered (the module's step 3 list)."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return _CARD.sub(_card_or_digits, text)


def is_sensitive_key(key: object) -> bool:
    normal = str(key).lower().replace("-", "").replace("_", "")
    return any(part in normal for part in SENSITIVE_KEY_PARTS)


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > _DEPTH_MAX:
        return FILTERED
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {
            k: FILTERED if is_sensitive_key(k) and v not in (None, "") else _scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return FILTERED
    return value


#: Events are a few levels deep; anything deeper is filtered rather than walked.
_DEPTH_MAX = 32


def _url_without_query(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # and without user and password
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _card_or_digits(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return FILTERED if _luhn_valid(digits) else match.group(0)


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        n = int(char)
        if index % 2 == 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0
