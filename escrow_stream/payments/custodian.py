"""The USDC-on-Base rail: a custodian's REST API, with ``httpx``.

The custodian is "Coinbase Prime-style" (SPEC §5): it holds the platform's USDC, gives out
deposit addresses and sends transfers, and reports both by signed webhook.  The shapes used
(and spoken by the local stand-in in ``tests/standins/custodian.py``), all JSON, amounts as
strings of USDC base units (6 decimals):

* ``POST /v1/deposit-addresses`` ``{"reference", "asset": "USDC", "network": "base"}`` →
  ``{"id", "address", "asset", "network", "reference"}``.  ``reference`` is our escrowId;
  the custodian echoes it in every ``deposit.confirmed`` for that address.
* ``POST /v1/transfers`` ``{"reference", "asset", "network", "amount", "destination":
  {"address"}, "metadata"}`` → ``{"id", "status": "PENDING" | "COMPLETED" | "FAILED",
  "reference", "amount", ...}``.  ``reference`` is our settlement key.
* ``GET /v1/deposits?created_after=ISO-8601&cursor=C&limit=N`` (reconciliation) →
  ``{"data": [{"id", "address", "reference", "fromAddress", "amount", "asset", "network",
  "confirmations", "status": "PENDING" | "CONFIRMED", "txHash", "createdAt"}],
  "pagination": {"nextCursor": C | null, "hasNext": bool}}``, oldest first; ``reference`` is
  the escrowId of the deposit address.
* ``GET /v1/transfers?created_after=ISO-8601&cursor=C&limit=N`` → the same envelope of
  transfer objects as ``POST /v1/transfers`` answers, each with ``createdAt``; a transfer
  returning unmatched USDC has the reference ``unmatched:{fundsId}``.
* Every request carries ``Authorization: Bearer CUSTODIAN_API_KEY`` and every POST an
  ``Idempotency-Key``: the same key returns the object created the first time, never a
  second one.  Errors are ``{"error": {"code", "message"}}``.

4xx answers (but 408, 409 "in progress" and 429) are refusals: a retry will not change
them.  Anything else — 5xx, 408, 429, timeouts, lost connections — leaves the outcome
unknown: the call is retried here ``ESCROW_MAX_RETRIES`` times with backoff from
``ESCROW_RETRY_DELAY_MS``, then :class:`CustodianUnavailable` goes to the caller, which
retries later with the same key.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any

import httpx

from escrow_stream.config import Settings
from escrow_stream.domain import Escrow, SettlementKind, WalletDestination
from escrow_stream.metrics import metered
from escrow_stream.payments.common import PermanentSettlementError, pending_settlement
from escrow_stream.retry import delays

ASSET = "USDC"
NETWORK = "base"
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
RETRY_CAP_S = 10.0
#: Waits after the first are at least this long, so ``ESCROW_RETRY_DELAY_MS=0`` backs off too.
RETRY_FLOOR_S = 0.01
#: Answers whose outcome is unknown or that ask us to come back later.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
#: Listing (reconciliation): objects per page, and pages at most (a bound, not a limit hit).
LIST_PAGE_SIZE = 100
LIST_PAGES_MAX = 10_000


class CustodianUnavailable(Exception):
    """The custodian did not give an answer we can act on; try again later, same key."""


class CustodianRefused(Exception):
    """The custodian refused the request for good (HTTP 4xx)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


def deposit_key(escrow_id: str) -> str:
    return f"escrow-deposit:{escrow_id}"


def is_address(value: object) -> bool:
    return isinstance(value, str) and bool(ADDRESS.match(value))


class CustodianClient:
    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=settings.custodian_api_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {settings.custodian_api_key.get_secret_value()}",
                "User-Agent": "escrow-stream",
            },
            timeout=settings.provider_timeout_ms / 1000,
            transport=transport,
        )
        self._retries = settings.escrow_max_retries
        self._delay_s = settings.escrow_retry_delay_ms / 1000

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create_deposit_address(self, escrow_id: str) -> dict[str, Any]:
        body = {"reference": escrow_id, "asset": ASSET, "network": NETWORK}
        answer = await self._post("/v1/deposit-addresses", body, deposit_key(escrow_id))
        if not answer.get("id") or not is_address(answer.get("address")):
            raise CustodianUnavailable("deposit address answer without id or address")
        return answer

    async def create_transfer(
        self, key: str, amount: int, to_address: str, metadata: dict[str, str]
    ) -> dict[str, Any]:
        body = {
            "reference": key,
            "asset": ASSET,
            "network": NETWORK,
            "amount": str(amount),
            "destination": {"address": to_address},
            "metadata": metadata,
        }
        answer = await self._post("/v1/transfers", body, key)
        if not answer.get("id"):
            raise CustodianUnavailable("transfer answer without id")
        return answer

    async def list_deposits(self, created_after: datetime) -> list[dict[str, Any]]:
        """Every deposit created at or after ``created_after``, all pages."""
        return await self._list("/v1/deposits", created_after)

    async def list_transfers(self, created_after: datetime) -> list[dict[str, Any]]:
        """Every transfer created at or after ``created_after``, all pages."""
        return await self._list("/v1/transfers", created_after)

    async def _list(self, path: str, created_after: datetime) -> list[dict[str, Any]]:
        """Follow ``pagination.nextCursor`` up to ``LIST_PAGES_MAX`` pages."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(LIST_PAGES_MAX):
            params = {"created_after": created_after.isoformat(), "limit": str(LIST_PAGE_SIZE)}
            if cursor:
                params["cursor"] = cursor
            page = await self._get(path, params)
            data = page.get("data")
            if not isinstance(data, list):
                raise CustodianUnavailable(f"GET {path}: no data list")
            items += [item for item in data if isinstance(item, dict)]
            pagination = page.get("pagination") or {}
            cursor = pagination.get("nextCursor")
            if not pagination.get("hasNext") or not cursor:
                return items
        raise CustodianUnavailable(f"GET {path}: more than {LIST_PAGES_MAX} pages")

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """A listing page; a refusal too is "no answer" for the caller (reconciliation)."""
        try:
            return await self._request("GET", path, params=params)
        except CustodianRefused as exc:
            raise CustodianUnavailable(f"GET {path}: HTTP {exc}") from None

    async def _post(self, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
        return await self._request("POST", path, json=body, headers={"Idempotency-Key": key})

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON object answered, retried (module docstring); raises CustodianRefused or
        CustodianUnavailable."""
        waits = delays(self._delay_s, RETRY_CAP_S, floor_s=RETRY_FLOOR_S)
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                response = await metered("custodian", self._http.request(method, path, **kwargs))
            except httpx.HTTPError as exc:  # timeout, connection refused or lost
                if last:
                    raise CustodianUnavailable(f"{method} {path}: {type(exc).__name__}") from exc
            else:
                status = response.status_code
                if 200 <= status < 300:
                    try:
                        answer = response.json()
                    except ValueError:
                        raise CustodianUnavailable(f"{method} {path}: not JSON") from None
                    if not isinstance(answer, dict):
                        raise CustodianUnavailable(f"{method} {path}: not a JSON object")
                    return answer
                if 400 <= status < 500 and status not in RETRYABLE_STATUS:
                    code, message = _error(response)
                    raise CustodianRefused(status, code, message)
                if last:
                    raise CustodianUnavailable(f"{method} {path}: HTTP {status}")
            await asyncio.sleep(next(waits))
        raise AssertionError("unreachable")


def _error(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json().get("error") or {}
        return str(error.get("code") or response.status_code), str(error.get("message") or "")
    except (ValueError, AttributeError):
        return str(response.status_code), response.text[:500]


class CustodianRail:
    """The agent's view of the custodian (see ``agents.payment_effects.Rail``)."""

    def __init__(self, client: CustodianClient) -> None:
        self._client = client

    async def payment_instructions(self, escrow: Escrow) -> dict[str, Any]:
        """A deposit address for the escrow: where the buyer sends the USDC.  Raises
        :class:`PermanentSettlementError` when the custodian refuses (4xx)."""
        try:
            address = await self._client.create_deposit_address(escrow.escrow_id)
        except CustodianRefused as exc:
            raise PermanentSettlementError(exc.code, str(exc)) from exc
        return {
            "provider": "custodian",
            "providerPaymentId": address["id"],
            "depositAddress": address["address"],
        }

    async def cancel_instructions(self, escrow: Escrow, payment_id: str) -> None:
        """A deposit address cannot be withdrawn: a deposit that still arrives is unmatched
        funds, returned to its sender.  Nothing to call."""

    async def settle(self, escrow: Escrow) -> None:
        """Send the pending settlement's transfer.  Completion arrives by webhook
        (``transfer.completed`` → ConfirmSettlement), so there is nothing to confirm here.

        Both go to the wallet the settlement recorded as its ``destination`` when it was
        requested: RELEASE the seller's ACTIVE payout wallet (never a value from the escrow's
        create body); REFUND ``buyerWalletAddress`` when the buyer gave one, else the
        deposit's sender (settlements requested before destinations were recorded: the same
        rule, read from the escrow).
        """
        settlement = pending_settlement(escrow)
        destination = settlement.destination
        wallet = destination.address if isinstance(destination, WalletDestination) else None
        if settlement.kind is SettlementKind.RELEASE:
            to_address = wallet
            missing = "no_payout_destination", "the release records no seller wallet"
        else:
            sender = escrow.payment.sender_address if escrow.payment else None
            to_address = wallet or escrow.buyer_wallet_address or sender
            missing = "no_refund_address", "neither a buyer wallet nor the deposit's sender"
        if not is_address(to_address):
            raise PermanentSettlementError(*missing)
        key = settlement.settlement_id
        try:
            await self._client.create_transfer(
                key,
                settlement.payout_amount,
                str(to_address),
                {"escrow_id": escrow.escrow_id, "settlement_id": key},
            )
        except CustodianRefused as exc:
            raise PermanentSettlementError(exc.code, str(exc)) from exc
