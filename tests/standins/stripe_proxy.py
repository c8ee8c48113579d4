"""A test stand-in in front of the real stripe-mock: a reverse proxy that adds what stripe-mock
lacks, Stripe's idempotency, and the provider faults the payments agent must survive.

stripe-mock is stateless: the same ``Idempotency-Key`` twice creates two objects.  Stripe
itself stores the answer to the first request per key and replays it to every later one
(header ``Idempotent-Replayed: true``), and refuses a key reused with other parameters
(400 ``idempotency_error``).  This proxy does both, so "objects Stripe created" is the number
of distinct keys it forwarded successfully — counted here, on the provider's side.  Only a
2xx answer is stored: a fault injected before forwarding models a request that never reached
Stripe's API, which Stripe does not store either.

It serves real HTTP on 127.0.0.1 from a thread with its own event loop, so a worker process
can call it through ``STRIPE_API_BASE``.  Faults are programmed per path prefix (and method,
POST unless told; and, when given, only for idempotency keys containing ``key_contains``)
and used up one per matching request, in the order programmed:

* :meth:`StripeProxy.lose_response` — forward (the object IS created and stored), then drop
  the connection unanswered;
* :meth:`StripeProxy.fail` — answer a Stripe-shaped error (500 ``api_error`` unless told,
  e.g. 400 ``invalid_request_error`` with a ``code``: a refusal) unforwarded;
* :meth:`StripeProxy.delay` — forward, store, then answer only after ``seconds`` (longer than
  the client's timeout, so the client gives up first).

stripe-mock also keeps no objects: its list endpoints answer one fixed fixture without our
metadata, and its created objects echo neither ``metadata`` nor ``transfer_group`` and all
carry ``created`` = 1234567890.  Reconciliation (``escrow-stream reconcile --providers``)
lists PaymentIntents, Transfers and Refunds, so the proxy fills that gap: every object
created through it (``POST /v1/payment_intents``, ``/v1/transfers``, ``/v1/refunds``) is
remembered, with the request's ``amount``, ``currency``, ``metadata``, ``transfer_group`` and
``payment_intent`` laid over stripe-mock's answer and ``created`` = now (a replayed key gives
the same object), and ``GET`` on those three paths is answered from memory in Stripe's list
shape (``object: "list"``, ``data`` newest first, ``has_more``, ``url``; ``limit``,
``starting_after``, ``created[gte|gt|lte|lt]``, ``transfer_group``, ``payment_intent``).
For the tests: :meth:`StripeProxy.inject` puts an object at "the provider" that nobody
created through the API, :meth:`StripeProxy.forget` removes one (ours, not at the provider),
and :meth:`StripeProxy.mark_succeeded` pays a PaymentIntent (``status``,
``amount_received``), as the buyer's card would.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web

from tests.standins.server import ThreadedServer

STRIPE_MOCK = "http://127.0.0.1:12111"
UPSTREAM_TIMEOUT_S = 30.0
# hop-by-hop or recomputed by the server/client on each side
_DROPPED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "accept-encoding",
        "content-encoding",
    }
)

#: The resources the proxy remembers and lists: path -> Stripe object name.
LISTED = {
    "/v1/payment_intents": "payment_intent",
    "/v1/transfers": "transfer",
    "/v1/refunds": "refund",
}
#: Request parameters laid over stripe-mock's answer.
OVERLAID = ("amount", "currency", "transfer_group", "payment_intent")

FaultKind = Literal["lose", "fail", "delay"]
Action = Literal["forwarded", "replayed", "failed", "conflict"]


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    status: int = 500
    seconds: float = 0.0
    key_contains: str | None = None  # only requests whose Idempotency-Key contains it
    error_type: str = "api_error"
    code: str | None = None


@dataclass(frozen=True)
class Entry:
    """One request the proxy received and what it did with it."""

    method: str
    path: str
    key: str | None
    action: Action  # forwarded upstream / replayed from the store / answered by a fault
    fault: FaultKind | None
    status: int  # the answer's, whether or not it reached the caller (fault "lose": not)


@dataclass
class _Stored:
    body: bytes  # the request's, to refuse the key reused with other parameters
    status: int
    headers: dict[str, str]
    answer: bytes


class StripeProxy(ThreadedServer):
    def __init__(self, upstream: str = STRIPE_MOCK) -> None:
        super().__init__()
        self.upstream = upstream
        self.log: list[Entry] = []
        self.created: Counter[str] = Counter()  # by path: distinct keys forwarded
        self._stored: dict[str, _Stored] = {}  # by idempotency key
        self._faults: dict[tuple[str, str], deque[Fault]] = {}
        self._key_locks: dict[str, asyncio.Lock] = {}  # one request at a time per key
        self._session: aiohttp.ClientSession | None = None
        #: what "Stripe" holds, per listed path: object id -> object, in creation order
        self.objects: dict[str, dict[str, dict[str, Any]]] = {path: {} for path in LISTED}

    # -- the test's side: objects at the provider ------------------------------------

    def inject(
        self,
        path: str,
        amount: int,
        metadata: dict[str, str],
        currency: str = "usd",
        **fields: Any,
    ) -> dict[str, Any]:
        """Put an object at the provider that no API call created (``path``: a LISTED one)."""
        name = LISTED[path]
        prefix = {"payment_intent": "pi", "transfer": "tr", "refund": "re"}[name]
        obj: dict[str, Any] = {
            "id": f"{prefix}_injected{uuid.uuid4().hex[:14]}",
            "object": name,
            "amount": amount,
            "currency": currency,
            "metadata": dict(metadata),
            "created": int(time.time()),
            "status": {"payment_intent": "succeeded", "refund": "succeeded"}.get(name),
            **fields,
        }
        if name == "payment_intent":
            obj.setdefault("amount_received", amount if obj["status"] == "succeeded" else 0)
        with self.lock:
            self.objects[path][obj["id"]] = obj
        return obj

    def forget(self, object_id: str) -> dict[str, Any]:
        """Remove an object from the provider (it will not be listed any more)."""
        with self.lock:
            for objects in self.objects.values():
                if object_id in objects:
                    return objects.pop(object_id)
        raise KeyError(object_id)

    def find(self, object_id: str) -> dict[str, Any] | None:
        with self.lock:
            for objects in self.objects.values():
                if object_id in objects:
                    return dict(objects[object_id])
        return None

    def mark_succeeded(self, intent_id: str, amount_received: int | None = None) -> None:
        """The buyer paid the PaymentIntent (all of it unless told)."""
        with self.lock:
            intent = self.objects["/v1/payment_intents"][intent_id]
            intent["status"] = "succeeded"
            intent["amount_received"] = (
                intent["amount"] if amount_received is None else amount_received
            )

    def _remember(self, path: str, body: bytes, answer: bytes) -> bytes:
        """A created object of a LISTED path, with the request's parameters laid over
        stripe-mock's answer, remembered; the answer the caller gets."""
        params = parse_qsl(body.decode(), keep_blank_values=True)
        obj: dict[str, Any] = json.loads(answer)
        metadata = {k[len("metadata[") : -1]: v for k, v in params if k.startswith("metadata[")}
        obj["metadata"] = metadata
        for name, value in params:
            if name in OVERLAID:
                obj[name] = int(value) if name == "amount" else value
        obj["created"] = int(time.time())
        if LISTED[path] == "payment_intent":
            obj["status"], obj["amount_received"] = "requires_payment_method", 0
        with self.lock:
            self.objects[path][obj["id"]] = obj
        return json.dumps(obj).encode()

    def _list(self, request: web.Request) -> web.Response:
        """Stripe's list shape, newest first, from what the proxy remembers."""
        query = request.query
        limit = max(1, min(100, int(query.get("limit", "10"))))
        bounds = {
            op: int(query[f"created[{op}]"])
            for op in ("gte", "gt", "lte", "lt")
            if f"created[{op}]" in query
        }
        with self.lock:
            found = [dict(o) for o in self.objects[request.path].values()]
        found.sort(key=lambda o: (o["created"], o["id"]), reverse=True)
        tests = {
            "gte": lambda c, b: c >= b,
            "gt": lambda c, b: c > b,
            "lte": lambda c, b: c <= b,
            "lt": lambda c, b: c < b,
        }
        found = [
            o
            for o in found
            if all(tests[op](o["created"], bound) for op, bound in bounds.items())
            and all(
                query[name] == o.get(name)
                for name in ("transfer_group", "payment_intent")
                if name in query
            )
        ]
        after = query.get("starting_after")
        if after:
            ids = [o["id"] for o in found]
            found = found[ids.index(after) + 1 :] if after in ids else []
        page = found[:limit]
        return web.json_response(
            {"object": "list", "data": page, "has_more": len(found) > limit, "url": request.path}
        )

    # -- the test's side -------------------------------------------------------------

    def lose_response(self, prefix: str, n: int, method: str = "POST") -> None:
        self._program(prefix, method, [Fault("lose")] * n)

    def fail(
        self,
        prefix: str,
        n: int,
        status: int = 500,
        method: str = "POST",
        key_contains: str | None = None,
        error_type: str = "api_error",
        code: str | None = None,
    ) -> None:
        fault = Fault("fail", status, 0.0, key_contains, error_type, code)
        self._program(prefix, method, [fault] * n)

    def delay(self, prefix: str, n: int, seconds: float, method: str = "POST") -> None:
        self._program(prefix, method, [Fault("delay", seconds=seconds)] * n)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        with self.lock:
            return sum(len(q) for q in self._faults.values())

    def requests(self, prefix: str, key_contains: str, method: str = "POST") -> list[Entry]:
        """The log entries for ``method`` on ``prefix`` whose key contains ``key_contains``."""
        with self.lock:
            return [
                e
                for e in self.log
                if e.method == method
                and e.path.startswith(prefix)
                and key_contains in (e.key or "")
            ]

    def created_keys(self, prefix: str, key_contains: str) -> set[str]:
        """Distinct idempotency keys for which stripe-mock created an object on ``prefix``."""
        return {
            str(e.key)
            for e in self.requests(prefix, key_contains)
            if e.action == "forwarded" and 200 <= e.status < 300
        }

    def stored_answer(self, key: str) -> bytes | None:
        with self.lock:
            stored = self._stored.get(key)
            return stored.answer if stored else None

    def _program(self, prefix: str, method: str, faults: list[Fault]) -> None:
        with self.lock:
            self._faults.setdefault((method.upper(), prefix), deque()).extend(faults)

    def _next_fault(self, method: str, path: str, key: str | None) -> Fault | None:
        with self.lock:
            for (m, prefix), queue in self._faults.items():
                if m != method or not path.startswith(prefix):
                    continue
                for fault in queue:
                    if fault.key_contains is None or fault.key_contains in (key or ""):
                        queue.remove(fault)
                        return fault
        return None

    def _record(self, entry: Entry) -> None:
        with self.lock:
            self.log.append(entry)

    # -- the server ------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.cleanup_ctx.append(self._upstream_session)
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _upstream_session(self, app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S)
        )
        yield
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        key = request.headers.get("Idempotency-Key")
        if key is None:
            response, fault = await self._answer(request, self._session, None)
        else:
            async with self._key_locks.setdefault(key, asyncio.Lock()):
                response, fault = await self._answer(request, self._session, key)
        if fault is not None and fault.kind == "lose":
            # done upstream, but the answer never reaches the caller
            assert request.transport is not None
            request.transport.abort()
        elif fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.seconds)  # the key is free again meanwhile
        return response

    async def _answer(
        self, request: web.Request, session: aiohttp.ClientSession, key: str | None
    ) -> tuple[web.Response, Fault | None]:
        """The answer to one request, and the fault still to apply on the way back.

        1. A ``fail`` fault answers unforwarded.
        2. A key stored with other parameters is refused; a stored key is replayed.
        3. Otherwise forward upstream; a 2xx answer with a key is stored (an object created).
        4. The caller loses (``lose``) or waits for (``delay``) the answer.
        """
        method, path = request.method, request.path
        body = await request.read()
        fault = self._next_fault(method, path, key)
        if fault is not None and fault.kind == "fail":
            self._record(Entry(method, path, key, "failed", "fail", fault.status))
            error = _error(fault.status, fault.error_type, "injected by the test proxy", fault.code)
            return error, None
        if method == "GET" and path in LISTED:
            self._record(Entry(method, path, key, "forwarded", None, 200))
            return self._list(request), None

        with self.lock:
            stored = self._stored.get(key) if key is not None else None
        if stored is not None and stored.body != body:
            self._record(Entry(method, path, key, "conflict", None, 400))
            message = f"key {key} was first used with other parameters"
            return _error(400, "idempotency_error", message), None
        if stored is not None:
            action: Action = "replayed"
            status, headers, answer = stored.status, dict(stored.headers), stored.answer
            headers["Idempotent-Replayed"] = "true"
        else:
            action = "forwarded"
            status, headers, answer = await self._forward(request, session, body)
            if method == "POST" and path in LISTED and 200 <= status < 300:
                answer = self._remember(path, body, answer)
            if key is not None and 200 <= status < 300:
                with self.lock:
                    self._stored[key] = _Stored(body, status, headers, answer)
                    self.created[path] += 1

        self._record(Entry(method, path, key, action, fault.kind if fault else None, status))
        return web.Response(status=status, headers=headers, body=answer), fault

    async def _forward(
        self, request: web.Request, session: aiohttp.ClientSession, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED_HEADERS}
        async with session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            answer = await upstream.read()
            back = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED_HEADERS}
            return upstream.status, back, answer


def _error(status: int, kind: str, message: str, code: str | None = None) -> web.Response:
    error = {"type": kind, "message": message, **({"code": code} if code else {})}
    return web.json_response({"error": error}, status=status)
