"""Local stand-ins for TRM Labs and Chainalysis, speaking the shapes ``escrow_stream.payments.
screening`` documents (TRM Wallet Screening v2; Chainalysis Address Screening, risk v2).

They serve real HTTP on 127.0.0.1 from a thread with its own event loop
(:class:`~tests.standins.server.ThreadedServer`), so a worker *process* can call them through
``TRM_API_URL`` / ``CHAINALYSIS_API_URL`` while the test runs.  Like the real APIs they

* check authentication: HTTP Basic with the API key as user name and password (TRM), the
  ``Token`` header (Chainalysis); 401 otherwise;
* check the request shape: 400 on a body that is not JSON or not the documented shape;
* answer the documented response shapes.

The test's side:

* ``requests``: every request, in arrival order, as ``{"method", "path", "body",
  "status"}`` (JSON-able; no headers, so no keys); :meth:`requests_to` filters by path.
* :meth:`flag` an address (sanctioned by default; :meth:`high_risk` for a High level
  without sanctions); Chainalysis's :meth:`ChainalysisStandin.set_status` answers a
  ``status`` other than COMPLETE.
* Faults for the next requests, in order, whatever their path (before authentication,
  like a failing load balancer): :meth:`fail_next` (500 or another status),
  :meth:`throttle_next` (429 with ``Retry-After``), :meth:`delay_next` (answer late,
  e.g. past ``PROVIDER_TIMEOUT_MS``), :meth:`malformed_next` (200 that is not JSON).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import BasicAuth, web

from tests.standins.server import ThreadedServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Where the middleware leaves the parsed body for the handlers; NOT_JSON if it is not.
BODY: web.RequestKey[Any] = web.RequestKey("standin.body", object)
NOT_JSON = object()

#: TRM's score for each level label.
TRM_LEVELS = {"Unknown": 0, "Low": 1, "Medium": 5, "High": 10, "Severe": 15}
CHAINALYSIS_RISKS = ("Low", "Medium", "High", "Severe")


@dataclass(frozen=True)
class Fault:
    """What the stand-in does to one request instead of (or before) answering it."""

    status: int | None = None  # answer this status at once
    retry_after_s: int | None = None  # with a Retry-After header
    delay_s: float = 0.0  # wait this long first, then answer normally
    malformed: bool = False  # answer 200 with a body that is not JSON


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def _non_empty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


class _RiskStandin(ThreadedServer):
    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self._faults: deque[Fault] = deque()

    # -- the test's side -------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def fail_next(self, n: int, status: int = 500) -> None:
        self._add_faults(n, Fault(status=status))

    def throttle_next(self, n: int, retry_after_s: int = 1) -> None:
        self._add_faults(n, Fault(status=429, retry_after_s=retry_after_s))

    def delay_next(self, n: int, delay_s: float) -> None:
        self._add_faults(n, Fault(delay_s=delay_s))

    def malformed_next(self, n: int) -> None:
        self._add_faults(n, Fault(malformed=True))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def requests_to(self, path_prefix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.requests if r["path"].startswith(path_prefix)]

    def _add_faults(self, n: int, fault: Fault) -> None:
        with self.lock:
            self._faults.extend([fault] * n)

    # -- serving ---------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self._middleware)
        self.add_routes(app)

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def authorized(self, request: web.Request) -> bool:
        raise NotImplementedError

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Log the request; a fault or missing credentials answer it before the handler."""
        raw = await request.read()
        try:
            request[BODY] = json.loads(raw) if raw else None
            body: Any = request[BODY]
        except ValueError:
            request[BODY] = NOT_JSON
            body = raw.decode(errors="replace")
        entry: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "body": body,
            "status": None,
        }
        with self.lock:
            self.requests.append(entry)
            fault = self._faults.popleft() if self._faults else None
        response = await self._answer(request, handler, fault)
        with self.lock:
            entry["status"] = response.status
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, fault: Fault | None
    ) -> web.StreamResponse:
        if fault is not None:
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault.status is not None:
                response = _error(fault.status, "stand-in fault")
                if fault.retry_after_s is not None:
                    response.headers["Retry-After"] = str(fault.retry_after_s)
                return response
            if fault.malformed:
                return web.Response(text="<html>gateway hiccup</html>", content_type="text/html")
        if not self.authorized(request):
            return _error(401, "Unauthorized")
        if request[BODY] is NOT_JSON:
            return _error(400, "the request body is not JSON")
        return await handler(request)


class TrmStandin(_RiskStandin):
    """TRM Labs Wallet Screening v2: ``POST /public/v2/screening/addresses``."""

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        #: lower-cased address → [(category, level label)]
        self.flagged: dict[str, list[tuple[str, str]]] = {}

    def flag(self, address: str, category: str = "Sanctions", level: str = "Severe") -> None:
        """Give ``address`` a risk indicator and entity; by default it is sanctioned."""
        if level not in TRM_LEVELS:
            raise ValueError(f"TRM levels are {sorted(TRM_LEVELS)}")
        with self.lock:
            self.flagged.setdefault(address.lower(), []).append((category, level))

    def high_risk(self, address: str, category: str = "Mixer") -> None:
        self.flag(address, category, "High")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/public/v2/screening/addresses", self._screen)

    def authorized(self, request: web.Request) -> bool:
        try:
            auth = BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            return False
        key = self.api_key.encode()
        return hmac.compare_digest(auth.login.encode(), key) and hmac.compare_digest(
            auth.password.encode(), key
        )

    async def _screen(self, request: web.Request) -> web.Response:
        body = request[BODY]
        if not isinstance(body, list) or not body:
            return _error(400, "the body must be a non-empty list of addresses")
        for item in body:
            if (
                not isinstance(item, dict)
                or not _non_empty_string(item.get("address"))
                or not _non_empty_string(item.get("chain"))
                or not isinstance(item.get("accountExternalId"), str | None)
            ):
                return _error(400, "each item needs a string address and chain")
        return web.json_response([self._result(item) for item in body])

    def _result(self, submitted: dict[str, Any]) -> dict[str, Any]:
        address = str(submitted["address"])
        with self.lock:
            findings = list(self.flagged.get(address.lower(), []))
        indicators = [
            {
                "category": category,
                "categoryId": str(60 + n),
                "categoryRiskScoreLevel": TRM_LEVELS[level],
                "categoryRiskScoreLevelLabel": level,
                "incomingVolumeUsd": "125000.00",
                "outgoingVolumeUsd": "0.00",
                "totalVolumeUsd": "125000.00",
                "riskType": "OWNERSHIP",
            }
            for n, (category, level) in enumerate(findings)
        ]
        entities = [
            {
                "category": category,
                "categoryId": str(60 + n),
                "entity": f"{category} entity (stand-in)",
                "riskScoreLevel": TRM_LEVELS[level],
                "riskScoreLevelLabel": level,
                "trmUrn": f"/{category.lower()}/stand-in",
                "trmAppUrl": "https://app.trmlabs.com/",
            }
            for n, (category, level) in enumerate(findings)
        ]
        return {
            "accountExternalId": submitted.get("accountExternalId"),
            "address": address.lower(),
            "addressIncomingVolumeUsd": "125000.00" if findings else "0.00",
            "addressOutgoingVolumeUsd": "0.00",
            "addressRiskIndicators": indicators,
            "addressSubmitted": address,
            "addressTotalVolumeUsd": "125000.00" if findings else "0.00",
            "chain": submitted["chain"],
            "entities": entities,
            "externalId": f"trm-{address[-8:].lower()}",
            "trmAppUrl": f"https://app.trmlabs.com/address/{address.lower()}",
        }


class ChainalysisStandin(_RiskStandin):
    """Chainalysis Address Screening, risk v2: register, then read an entity's risk."""

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        #: lower-cased address → (risk, category)
        self.flagged: dict[str, tuple[str, str]] = {}
        self.registered: set[str] = set()
        self.default_status = "COMPLETE"
        self.statuses: dict[str, str] = {}

    def flag(self, address: str, risk: str = "Severe", category: str = "sanctions") -> None:
        """Rate ``address``; category ``sanctions`` also identifies it as sanctioned."""
        if risk not in CHAINALYSIS_RISKS:
            raise ValueError(f"Chainalysis risks are {CHAINALYSIS_RISKS}")
        with self.lock:
            self.flagged[address.lower()] = (risk, category)

    def high_risk(self, address: str, category: str = "mixing") -> None:
        self.flag(address, "High", category)

    def set_status(self, status: str, address: str | None = None) -> None:
        """Answer ``status`` (e.g. PENDING) for ``address``, or for every address."""
        with self.lock:
            if address is None:
                self.default_status = status
            else:
                self.statuses[address.lower()] = status

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/risk/v2/entities", self._register)
        app.router.add_get("/api/risk/v2/entities/{address}", self._entity)

    def authorized(self, request: web.Request) -> bool:
        token = request.headers.get("Token", "")
        return bool(token) and hmac.compare_digest(token.encode(), self.api_key.encode())

    async def _register(self, request: web.Request) -> web.Response:
        body = request[BODY]
        if not isinstance(body, dict) or not _non_empty_string(body.get("address")):
            return _error(400, "the body must be an object with an address")
        with self.lock:
            self.registered.add(str(body["address"]).lower())
        return web.json_response({"address": body["address"]}, status=201)

    async def _entity(self, request: web.Request) -> web.Response:
        address = request.match_info["address"]
        with self.lock:
            risk, category = self.flagged.get(address.lower(), ("Low", ""))
            status = self.statuses.get(address.lower(), self.default_status)
        sanctioned = category == "sanctions"
        flagged = bool(category)
        reason = None
        if sanctioned:
            reason = "Identified as sanctioned entity"
        elif flagged:
            reason = f"Significant direct exposure to {category}"
        return web.json_response(
            {
                "address": address,
                "risk": risk,
                "riskReason": reason,
                "cluster": (
                    {"name": f"{category} cluster (stand-in)", "category": category}
                    if flagged
                    else None
                ),
                "addressType": "PRIVATE_WALLET",
                "addressIdentifications": (
                    [
                        {
                            "name": "SANCTIONS: OFAC SDN (stand-in)",
                            "category": "sanctions",
                            "description": "Sanctioned address (stand-in)",
                            "url": "https://home.treasury.gov/",
                            "createdAt": 1700000000000,
                        }
                    ]
                    if sanctioned
                    else []
                ),
                "exposures": (
                    [
                        {
                            "category": category,
                            "value": 125000.0,
                            "exposureType": "direct",
                            "direction": "both_directions",
                        }
                    ]
                    if flagged
                    else []
                ),
                "triggers": (
                    [
                        {
                            "category": category,
                            "percentage": 1.0,
                            "message": f"{category} exposure (stand-in)",
                            "ruleTriggered": {
                                "risk": risk,
                                "minThreshold": 0,
                                "maxThreshold": 1,
                                "exposureType": "direct",
                                "direction": "both_directions",
                            },
                        }
                    ]
                    if flagged
                    else []
                ),
                "status": status,
            }
        )
