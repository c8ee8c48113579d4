"""A local stand-in for the USDC custodian, speaking the shapes ``escrow_stream.payments.custodian``
documents (Coinbase Prime-style: deposit addresses, transfers, signed webhooks).

It serves real HTTP on 127.0.0.1 from a thread of its own, so a worker process can call it
through ``CUSTODIAN_API_URL``.  Like a real custodian it

* checks ``Authorization: Bearer <key>`` (401 otherwise) and the request shapes (400);
* honours ``Idempotency-Key``: a key seen before returns the object created the first time;
* sends signed webhooks to the worker: ``deposit.confirmed`` when a test "pays"
  (:meth:`CustodianStandin.pay`), ``transfer.completed`` after each new transfer.

Faults for the tests: :meth:`fail_next` answers the next transfers with 500 without creating
anything; :meth:`lose_next` creates the transfer and then drops the connection unanswered.

For reconciliation it lists what it holds (``GET /v1/deposits``, ``GET /v1/transfers``, the
cursor pages ``escrow_stream.payments.custodian`` documents): the deposits a test paid with
:meth:`pay` (``CONFIRMED`` at ``min_confirmations`` or more, else ``PENDING``) and the
transfers it made (``COMPLETED`` once its webhook went out).  :meth:`inject_deposit` puts a
deposit at the custodian that nobody reported; :meth:`forget` removes a deposit or transfer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from aiohttp import web

from tests.standins.server import ThreadedServer


def signed_headers(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Custodian-Timestamp": stamp,
        "X-Custodian-Signature": digest,
    }


def address_for(seed: str) -> str:
    return "0x" + hashlib.sha256(seed.encode()).hexdigest()[:40]


class CustodianStandin(ThreadedServer):
    def __init__(self, api_key: str, webhook_secret: str) -> None:
        super().__init__()
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.webhook_url: str | None = None  # the worker's, once it runs
        self.deposit_addresses: dict[str, dict[str, Any]] = {}  # by idempotency key
        self.transfers: dict[str, dict[str, Any]] = {}  # by idempotency key
        self.requests: list[tuple[str, str, str | None, str]] = []
        self.webhooks_sent: list[dict[str, Any]] = []
        self._fail = 0
        self._lose = 0
        self.deposits: dict[str, dict[str, Any]] = {}  # by deposit id, in arrival order
        self.min_confirmations = 12

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/deposit-addresses", self._deposit_address)
        app.router.add_post("/v1/transfers", self._transfer)
        app.router.add_get("/v1/deposits", self._list_deposits)
        app.router.add_get("/v1/transfers", self._list_transfers)

    # -- listing (reconciliation) ----------------------------------------------------

    def inject_deposit(self, reference: str, amount: int, sender: str) -> dict[str, Any]:
        """A confirmed deposit at the custodian that no webhook reported."""
        deposit = self._deposit(f"dpt_injected_{uuid.uuid4().hex[:12]}", reference, amount)
        deposit.update(fromAddress=sender, confirmations=self.min_confirmations)
        with self.lock:
            self.deposits[deposit["id"]] = deposit
        return deposit

    def forget(self, object_id: str) -> dict[str, Any]:
        """Remove a deposit or a transfer: it is not listed any more."""
        with self.lock:
            if object_id in self.deposits:
                return self.deposits.pop(object_id)
            for key, transfer in list(self.transfers.items()):
                if transfer["id"] == object_id:
                    return self.transfers.pop(key)
        raise KeyError(object_id)

    def _deposit(self, deposit_id: str, reference: str, amount: int) -> dict[str, Any]:
        return {
            "id": deposit_id,
            "address": address_for(f"deposit:{reference}"),
            "reference": reference,
            "amount": str(amount),
            "asset": "USDC",
            "network": "base",
            "status": "CONFIRMED",
            "txHash": "0x" + hashlib.sha256(f"tx:{deposit_id}".encode()).hexdigest(),
            "createdAt": _now_iso(),
        }

    async def _list_deposits(self, request: web.Request) -> web.Response:
        with self.lock:
            items = [dict(d) for d in self.deposits.values()]
        return self._page(request, items)

    async def _list_transfers(self, request: web.Request) -> web.Response:
        with self.lock:
            items = [dict(t) for t in self.transfers.values()]
        return self._page(request, items)

    def _page(self, request: web.Request, items: list[dict[str, Any]]) -> web.Response:
        """Oldest first from ``created_after``; ``cursor`` = the index of the next item."""
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "unauthorized", "invalid API key")
        after = request.query.get("created_after")
        if after:
            bound = datetime.fromisoformat(after.replace("Z", "+00:00"))
            items = [i for i in items if datetime.fromisoformat(i["createdAt"]) >= bound]
        start = int(request.query.get("cursor") or 0)
        limit = max(1, min(100, int(request.query.get("limit", "100"))))
        page = items[start : start + limit]
        more = start + limit < len(items)
        pagination = {"nextCursor": str(start + limit) if more else None, "hasNext": more}
        return web.json_response({"data": page, "pagination": pagination})

    # -- the test's side -------------------------------------------------------------

    def fail_next(self, n: int) -> None:
        with self.lock:
            self._fail = n

    def lose_next(self, n: int) -> None:
        with self.lock:
            self._lose = n

    def transfers_for(self, escrow_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [t for t in self.transfers.values() if t["metadata"]["escrow_id"] == escrow_id]

    def transfer_requests_for(self, escrow_id: str) -> list[tuple[str, str, str | None, str]]:
        with self.lock:
            return [
                r for r in self.requests if r[1] == "/v1/transfers" and escrow_id in (r[2] or "")
            ]

    def pay(
        self,
        escrow_id: str,
        amount: int,
        sender: str,
        confirmations: int = 12,
        deposit_id: str | None = None,
        event_id: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """The buyer's USDC arrived at the escrow's deposit address: send deposit.confirmed."""
        with self.lock:
            address = next(
                a for a in self.deposit_addresses.values() if a["reference"] == escrow_id
            )
            deposit = self._deposit(deposit_id or f"dpt_{escrow_id}", escrow_id, amount)
            deposit.update(fromAddress=sender, confirmations=confirmations)
            if confirmations < self.min_confirmations:
                deposit["status"] = "PENDING"
            self.deposits[deposit["id"]] = {**self.deposits.get(deposit["id"], {}), **deposit}
        return self.send_webhook(
            "deposit.confirmed",
            {
                "id": deposit_id or f"dpt_{escrow_id}",
                "address": address["address"],
                "reference": escrow_id,
                "fromAddress": sender,
                "amount": str(amount),
                "asset": "USDC",
                "network": "base",
                "confirmations": confirmations,
                "txHash": "0x" + hashlib.sha256(f"tx:{escrow_id}".encode()).hexdigest(),
            },
            event_id,
        )

    def send_webhook(
        self, kind: str, data: dict[str, Any], event_id: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        assert self.webhook_url, "no webhook_url to deliver to"
        event = {
            "id": event_id or f"evt_{uuid.uuid4().hex}",
            "type": kind,
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data": data,
        }
        body = json.dumps(event).encode()
        response = httpx.post(
            self.webhook_url, content=body, headers=signed_headers(self.webhook_secret, body)
        )
        with self.lock:
            self.webhooks_sent.append(event)
        return response.status_code, response.json()

    def _check(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "unauthorized", "invalid API key")
        if not request.headers.get("Idempotency-Key"):
            return _error(400, "idempotency_key_required", "POST needs an Idempotency-Key")
        return None

    async def _deposit_address(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        with self.lock:
            self.requests.append(("POST", request.path, key, "received"))
        refused = self._check(request)
        if refused is not None:
            return refused
        body = await request.json()
        if (
            body.get("asset") != "USDC"
            or body.get("network") != "base"
            or not body.get("reference")
        ):
            return _error(400, "invalid_request", "reference, asset USDC and network base needed")
        with self.lock:
            address = self.deposit_addresses.setdefault(
                str(key),
                {
                    "id": f"da_{uuid.uuid4().hex[:16]}",
                    "address": address_for(f"deposit:{body['reference']}"),
                    "asset": "USDC",
                    "network": "base",
                    "reference": body["reference"],
                },
            )
        return web.json_response(address, status=201)

    async def _transfer(self, request: web.Request) -> web.StreamResponse:
        key = str(request.headers.get("Idempotency-Key"))
        refused = self._check(request)
        if refused is not None:
            return refused
        body = await request.json()
        destination = (body.get("destination") or {}).get("address", "")
        amount = str(body.get("amount", ""))
        if (
            body.get("asset") != "USDC"
            or not amount.isdigit()
            or not destination.startswith("0x")
            or not (body.get("metadata") or {}).get("escrow_id")
        ):
            return _error(400, "invalid_request", "asset, amount, destination, metadata needed")
        with self.lock:
            if self._fail > 0:
                self._fail -= 1
                self.requests.append(("POST", request.path, key, "500"))
                return _error(500, "internal_error", "try again")
            replay = key in self.transfers
            if not replay:
                self.transfers[key] = {
                    "id": f"tx_{uuid.uuid4().hex[:16]}",
                    "status": "PENDING",
                    "reference": body.get("reference"),
                    "amount": amount,
                    "asset": "USDC",
                    "network": "base",
                    "destination": {"address": destination},
                    "metadata": body["metadata"],
                    "createdAt": _now_iso(),
                }
            transfer = self.transfers[key]
            lose = self._lose > 0
            if lose:
                self._lose -= 1
            self.requests.append(
                ("POST", request.path, key, "lost" if lose else "replayed" if replay else "created")
            )
        if not replay:
            asyncio.get_running_loop().create_task(self._complete_later(transfer))
        if lose:  # created, but the answer never reaches the caller
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        return web.json_response(transfer, status=201)

    async def _complete_later(self, transfer: dict[str, Any]) -> None:
        """On chain: the transfer completes and the custodian tells the platform."""
        await asyncio.sleep(0.2)
        data = {**transfer, "status": "COMPLETED", "txHash": address_for(transfer["id"]) + "ab"}
        with self.lock:
            transfer.update(status="COMPLETED", txHash=data["txHash"])
        await asyncio.to_thread(self.send_webhook, "transfer.completed", data)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)
