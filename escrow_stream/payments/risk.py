"""Risk screening of a deposit's sender address with TRM Labs and Chainalysis (``httpx``).

Both providers must pass.  Any provider error, timeout, refusal or malformed answer is
:class:`ScreeningUnavailable`, never a pass, so funds are never held unscreened (SPEC §5).

The shapes followed (and spoken by the stand-ins in ``tests/standins/risk.py``):

* **TRM Labs**, Wallet Screening API v2 (``docs.trmlabs.com``; field names as in TRM's
  documented response and typed clients, e.g. threshold-network/token-dashboard
  ``src/types/trm.ts``): ``POST {TRM_API_URL}/public/v2/screening/addresses`` with HTTP
  Basic auth, the API key as both user name and password, and a JSON *list* body
  ``[{"address", "chain", "accountExternalId"}]``.  The answer is a list with one object
  per address: ``address``, ``addressSubmitted``, ``chain``, ``accountExternalId``,
  ``externalId``, ``addressRiskIndicators`` (``category``, ``categoryId``,
  ``categoryRiskScoreLevel``, ``categoryRiskScoreLevelLabel``, ``incomingVolumeUsd``,
  ``outgoingVolumeUsd``, ``totalVolumeUsd``, ``riskType``) and ``entities``
  (``category``, ``categoryId``, ``entity``, ``riskScoreLevel``, ``riskScoreLevelLabel``,
  ``trmUrn``, ``trmAppUrl``).  Levels: Unknown 0, Low 1, Medium 5, High 10, Severe 15.
  The address fails when an indicator's or an entity's label is High or Severe, or any
  category is Sanctions (case-insensitive).
* **Chainalysis**, Address Screening / Entity Risking API, risk v2
  (``docs.chainalysis.com/api/address-screening/``): header ``Token: <api key>``;
  ``POST {CHAINALYSIS_API_URL}/api/risk/v2/entities`` ``{"address"}`` registers the address
  (optional since December 2024 but still supported; kept so older accounts work), then
  ``GET .../api/risk/v2/entities/{address}`` answers ``{"address", "risk": "Low" | "Medium"
  | "High" | "Severe", "riskReason", "cluster": {"name", "category"} | null,
  "addressType", "addressIdentifications": [{"name", "category", ...}], "exposures",
  "triggers", "status"}``.  It fails when ``risk`` is High or Severe, or an
  identification's (or the cluster's) category is sanctions; a ``status`` other than
  COMPLETE is not an answer yet (:class:`ScreeningUnavailable`).

Each HTTP call, in order:

1. is sent with ``PROVIDER_TIMEOUT_MS`` (connect, write, read, each);
2. a 2xx answer must be JSON of the documented shape (otherwise unavailable, no retry);
3. 400, 401, 403, 404 and other refusals are a configuration problem: unavailable at once;
4. connection errors, timeouts, 408, 429 and 5xx are retried at most ``ESCROW_MAX_RETRIES``
   times, waiting ``ESCROW_RETRY_DELAY_MS`` doubled each time (at least a 429's
   ``Retry-After``), capped at :data:`RETRY_DELAY_CAP_S`;
5. out of attempts: unavailable — the caller screens again later.

The API keys are never logged, never put in an exception (httpx errors are not chained:
they carry the request and its headers) and never in :attr:`ProviderVerdict.raw`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from escrow_stream.config import Settings
from escrow_stream.metrics import metered
from escrow_stream.payments.custodian import is_address
from escrow_stream.retry import backoff_s

log = logging.getLogger(__name__)

TRM = "trm"
CHAINALYSIS = "chainalysis"
TRM_SCREENING_PATH = "/public/v2/screening/addresses"
CHAINALYSIS_ENTITIES_PATH = "/api/risk/v2/entities"

#: Risk levels, lowest first, as both providers label them (lower-cased).
LEVELS = ("unknown", "low", "medium", "high", "severe")
FAILING_LEVELS = frozenset({"high", "severe"})
SANCTIONS = "sanctions"
CHAINALYSIS_DONE = "COMPLETE"

RETRY_DELAY_CAP_S = 5.0
#: Answers worth another attempt besides every 5xx: request timeout, rate limited.
RETRYABLE_STATUS = frozenset({408, 429})
#: Transport failures worth another attempt: connect/read/write errors and timeouts.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
#: Bounds of the compliance record kept per provider.
RAW_ITEMS_MAX = 20
TEXT_MAX = 200

Sleep = Callable[[float], Awaitable[None]]


class ScreeningUnavailable(Exception):
    """A provider gave no usable answer: screen again later; never a pass."""


@dataclass(frozen=True)
class ProviderVerdict:
    """One provider's answer: ``raw`` is a compact, JSON-able, secret-free summary."""

    provider: str
    passed: bool
    risk: str
    reasons: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """Both providers' answers; ``passed`` only if every provider passed."""

    passed: bool
    providers: tuple[ProviderVerdict, ...]

    def __post_init__(self) -> None:
        if self.passed and not all(p.passed for p in self.providers):
            raise ValueError("a verdict cannot pass when a provider failed the address")

    @classmethod
    def of(cls, providers: Iterable[ProviderVerdict]) -> Verdict:
        answers = tuple(providers)
        return cls(bool(answers) and all(p.passed for p in answers), answers)

    def reasons(self) -> list[str]:
        """Every provider's reasons, each prefixed with the provider's name."""
        return [f"{p.provider}: {r}" for p in self.providers for r in p.reasons]


# -- reading the providers' answers ---------------------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()[:TEXT_MAX]


def _fails(category: str, label: str) -> bool:
    return category.lower() == SANCTIONS or label.lower() in FAILING_LEVELS


def _highest(labels: Iterable[str], default: str) -> str:
    known = [label for label in labels if label.lower() in LEVELS]
    if not known:
        return default
    return max(known, key=lambda label: LEVELS.index(label.lower())).capitalize()


def _objects(provider: str, container: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """``container[key]``, which the documented shape says is a list of objects."""
    items = container.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ScreeningUnavailable(f"{provider}: malformed answer: {key} is not a list of objects")
    return items


def trm_verdict(answer: Any, address: str) -> ProviderVerdict:
    """TRM's answer (a list with one object per address) for ``address``."""
    if not isinstance(answer, list):
        raise ScreeningUnavailable("trm: malformed answer: not a list of address results")
    results = [
        r
        for r in answer
        if isinstance(r, dict) and _text(r.get("address")).lower() == address.lower()
    ]
    if not results:
        raise ScreeningUnavailable("trm: malformed answer: no result for the screened address")
    result = results[0]
    indicators = _objects(TRM, result, "addressRiskIndicators")
    entities = _objects(TRM, result, "entities")
    reasons: list[str] = []
    labels: list[str] = []
    for indicator in indicators:
        category = _text(indicator.get("category"))
        label = _text(indicator.get("categoryRiskScoreLevelLabel"))
        labels.append(label)
        if _fails(category, label):
            kind = _text(indicator.get("riskType")).lower() or "unknown"
            reasons.append(
                f"{category or 'uncategorised'} risk indicator ({label or 'unrated'}, {kind})"
            )
    for entity in entities:
        category = _text(entity.get("category"))
        label = _text(entity.get("riskScoreLevelLabel"))
        labels.append(label)
        if _fails(category, label):
            name = _text(entity.get("entity")) or "unnamed entity"
            reasons.append(f"entity {name}: {category or 'uncategorised'} ({label or 'unrated'})")
    raw = {
        "address": _text(result.get("address")),
        "chain": _text(result.get("chain")),
        "externalId": _text(result.get("externalId")) or None,
        "accountExternalId": _text(result.get("accountExternalId")) or None,
        "indicators": [
            {
                "category": _text(i.get("category")),
                "level": _text(i.get("categoryRiskScoreLevelLabel")),
                "riskType": _text(i.get("riskType")),
                "totalVolumeUsd": _text(i.get("totalVolumeUsd")),
            }
            for i in indicators[:RAW_ITEMS_MAX]
        ],
        "entities": [
            {
                "entity": _text(e.get("entity")),
                "category": _text(e.get("category")),
                "level": _text(e.get("riskScoreLevelLabel")),
                "trmUrn": _text(e.get("trmUrn")),
            }
            for e in entities[:RAW_ITEMS_MAX]
        ],
        "flagged": reasons[:RAW_ITEMS_MAX],
    }
    return ProviderVerdict(TRM, not reasons, _highest(labels, "Low"), tuple(reasons), raw)


def chainalysis_verdict(answer: Any, address: str) -> ProviderVerdict:
    """Chainalysis's ``GET /api/risk/v2/entities/{address}`` answer for ``address``."""
    if not isinstance(answer, dict):
        raise ScreeningUnavailable("chainalysis: malformed answer: not an object")
    status = _text(answer.get("status"))
    if status.upper() != CHAINALYSIS_DONE:
        raise ScreeningUnavailable(
            f"chainalysis: screening not complete (status {status or 'missing'})"
        )
    if _text(answer.get("address")).lower() != address.lower():
        raise ScreeningUnavailable("chainalysis: malformed answer: result is for another address")
    risk = _text(answer.get("risk"))
    if risk.lower() not in LEVELS[1:]:
        raise ScreeningUnavailable(f"chainalysis: malformed answer: risk {risk or 'missing'!r}")
    identifications = _objects(CHAINALYSIS, answer, "addressIdentifications")
    cluster = answer.get("cluster") if isinstance(answer.get("cluster"), dict) else None
    reasons: list[str] = []
    if risk.lower() in FAILING_LEVELS:
        reasons.append(f"risk {risk}: {_text(answer.get('riskReason')) or 'no reason given'}")
    for identification in identifications:
        if _text(identification.get("category")).lower() == SANCTIONS:
            name = _text(identification.get("name")) or "unnamed"
            reasons.append(f"identified as sanctioned: {name}")
    if cluster is not None and _text(cluster.get("category")).lower() == SANCTIONS:
        reasons.append(f"cluster {_text(cluster.get('name')) or 'unnamed'} is sanctioned")
    listed = answer.get("triggers")
    triggers: list[Any] = listed if isinstance(listed, list) else []
    raw = {
        "address": _text(answer.get("address")),
        "status": status,
        "risk": risk,
        "riskReason": _text(answer.get("riskReason")) or None,
        "addressType": _text(answer.get("addressType")) or None,
        "cluster": (
            {"name": _text(cluster.get("name")), "category": _text(cluster.get("category"))}
            if cluster is not None
            else None
        ),
        "identifications": [
            {"name": _text(i.get("name")), "category": _text(i.get("category"))}
            for i in identifications[:RAW_ITEMS_MAX]
        ],
        "triggers": [
            {"category": _text(t.get("category")), "percentage": t.get("percentage")}
            for t in triggers[:RAW_ITEMS_MAX]
            if isinstance(t, dict)
        ],
        "flagged": reasons[:RAW_ITEMS_MAX],
    }
    return ProviderVerdict(CHAINALYSIS, not reasons, risk.capitalize(), tuple(reasons), raw)


# -- talking to them ------------------------------------------------------------------


def _retryable(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUS


def _refusal(provider: str, status: int) -> str:
    setting = provider.upper()
    if status in (401, 403):
        return f"{provider}: HTTP {status}: the API key was refused (check {setting}_API_KEY)"
    if status == 404:
        return f"{provider}: HTTP 404: endpoint not found (check {setting}_API_URL)"
    if status in (400, 422):
        return f"{provider}: HTTP {status}: the provider refused the request as malformed"
    return f"{provider}: HTTP {status}: refused"


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0")))
    except ValueError:  # an HTTP date: the capped backoff decides
        return 0.0


def _describe(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"{type(exc).__name__} (no answer within {timeout_s:g} s)"
    detail = _text(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


class RiskScreener:
    """Screens an address with both providers at once; one HTTP client per provider."""

    def __init__(
        self,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._timeout_s = settings.provider_timeout_ms / 1000
        self._retries = settings.escrow_max_retries
        self._first_delay_s = settings.escrow_retry_delay_ms / 1000
        self._sleep = sleep
        trm_key = settings.trm_api_key.get_secret_value()
        self._trm = httpx.AsyncClient(
            base_url=settings.trm_api_url.rstrip("/"),
            auth=httpx.BasicAuth(trm_key, trm_key),
            headers={"Accept": "application/json"},
            timeout=self._timeout_s,
            transport=transport,
        )
        self._chainalysis = httpx.AsyncClient(
            base_url=settings.chainalysis_api_url.rstrip("/"),
            headers={
                "Token": settings.chainalysis_api_key.get_secret_value(),
                "Accept": "application/json",
            },
            timeout=self._timeout_s,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._trm.aclose()
        await self._chainalysis.aclose()

    async def screen(
        self, address: str, chain: str = "base", reference: str | None = None
    ) -> Verdict:
        """Both providers, concurrently; :class:`ScreeningUnavailable` if either has no
        answer (the other is cancelled): never a partial pass.  ``ValueError`` for a
        malformed address, before anyone is called."""
        if not is_address(address):
            raise ValueError(f"not a 0x address of 40 hex digits: {address!r}")
        if not chain:
            raise ValueError("chain is required")
        calls = [
            asyncio.ensure_future(self._screen_trm(address, chain, reference)),
            asyncio.ensure_future(self._screen_chainalysis(address)),
        ]
        try:
            answers: Sequence[ProviderVerdict] = await asyncio.gather(*calls)
        except BaseException:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            raise
        return Verdict.of(answers)

    async def _screen_trm(self, address: str, chain: str, reference: str | None) -> ProviderVerdict:
        item: dict[str, str] = {"address": address, "chain": chain}
        if reference is not None:
            item["accountExternalId"] = reference
        answer = await self._call(TRM, lambda: self._trm.post(TRM_SCREENING_PATH, json=[item]))
        return trm_verdict(answer, address)

    async def _screen_chainalysis(self, address: str) -> ProviderVerdict:
        await self._call(
            CHAINALYSIS,
            lambda: self._chainalysis.post(CHAINALYSIS_ENTITIES_PATH, json={"address": address}),
        )
        answer = await self._call(
            CHAINALYSIS,
            lambda: self._chainalysis.get(f"{CHAINALYSIS_ENTITIES_PATH}/{address}"),
        )
        return chainalysis_verdict(answer, address)

    async def _call(self, provider: str, send: Callable[[], Awaitable[httpx.Response]]) -> Any:
        """One request with the module's bounded retries; the answer's JSON."""
        attempts = self._retries + 1
        for attempt in range(attempts):
            retry_after_s = 0.0
            try:
                response = await metered(provider, send())
            except RETRYABLE_ERRORS as exc:
                problem = _describe(exc, self._timeout_s)
            except httpx.HTTPError as exc:  # not a network hiccup: no point retrying
                raise ScreeningUnavailable(
                    f"{provider}: request failed: {_describe(exc, self._timeout_s)}"
                ) from None
            else:
                status = response.status_code
                if 200 <= status < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise ScreeningUnavailable(
                            f"{provider}: malformed answer: HTTP {status} without JSON"
                        ) from None
                if not _retryable(status):
                    raise ScreeningUnavailable(_refusal(provider, status))
                problem = f"HTTP {status}"
                retry_after_s = _retry_after_s(response)
            if attempt + 1 == attempts:
                raise ScreeningUnavailable(f"{provider}: {problem} ({attempts} attempt(s))")
            backoff = backoff_s(attempt, self._first_delay_s, RETRY_DELAY_CAP_S)
            delay_s = min(RETRY_DELAY_CAP_S, max(backoff, retry_after_s))
            log.warning(
                "%s: %s; retrying in %.3f s (attempt %d of %d)",
                provider,
                problem,
                delay_s,
                attempt + 2,
                attempts,
            )
            await self._sleep(delay_s)
        raise AssertionError("unreachable")
