"""The escrow HTTP API (SPEC §4) as Faust web views.

Accepting a command (every ``POST``), in order:

1. Authenticate the bearer token; parse and validate the body (400, 413, 415, 422).
2. ``Idempotency-Key``: a completed same-body request replays its stored response; the same
   key with another body is 422 ``IDEMPOTENCY_KEY_REUSED``; one still in flight is 409.
3. Build the command (commandId derived from the user and the key when one is given, so a
   retry is the same command) and check it with the domain's own authorization rule against
   the escrow as its owning worker holds it (403 / 404 before anything is accepted).
4. In one PostgreSQL transaction: the command goes into the ``outbox`` and the idempotency
   record is completed; then the publisher is woken.  Only after the commit does the client
   get 202 — an accepted command survives Kafka being down.
5. ``Prefer: wait=N`` (N ≤ 30): poll the owning worker's tables for the command's outcome;
   201/200 with the escrow, the rejection as a problem, or 202 when N runs out.

Reads: ``GET /api/escrow/{id}`` and the command status are routed by Faust to the worker
that owns the escrow's partition of ``escrow-commands`` and read its table, so a GET right
after a successful wait shows the new state.  Lists and history read the PostgreSQL mirror
(eventually consistent: it trails the table by the mirror's batch delay).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, cast

import faust
from aiohttp import ClientSession, ClientTimeout
from faust.types import TableT
from faust.web import Request, Response, View
from pydantic import BaseModel, ValidationError
from yarl import URL

from escrow_stream.agents import handling
from escrow_stream.agents.processor import Topics, domain_settings, encode_command, make_command
from escrow_stream.clock import Clock
from escrow_stream.config import Settings
from escrow_stream.db import outbox
from escrow_stream.db.kyc import KycDirectory
from escrow_stream.db.outbox import OutboxPublisher
from escrow_stream.db.pool import Database
from escrow_stream.domain import (
    ActorRole,
    Command,
    CommandInvalid,
    Escrow,
    RejectionCode,
    is_release_path,
)
from escrow_stream.domain.commands import validation_errors
from escrow_stream.domain.guards import check_sender_authorized, max_amount_for_rail
from escrow_stream.idempotency import (
    Begin,
    BeginKind,
    IdempotencyStore,
)
from escrow_stream.signing import signature_headers
from escrow_stream.tables import escrows as escrow_table
from escrow_stream.web.auth import Principal, Role, authenticate
from escrow_stream.web.internal import INTERNAL_REQUEST_KEY, internal_headers
from escrow_stream.web.problems import Problem, rejection_problem
from escrow_stream.web.ratelimit import RateLimiter
from escrow_stream.web.schemas import (
    Accepted,
    CommandStatus,
    CreateEscrowBody,
    DeliverBody,
    DisputeBody,
    EmptyBody,
    EscrowHistory,
    EscrowPage,
    KycBody,
    KycStatus,
    RefundBody,
    ResolveBody,
)

WAIT_MAX_S = 30.0
WAIT_POLL_S = 0.05
PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 200
ROUTED_READ_TIMEOUT_S = 5.0
COMMAND_ID_NAMESPACE = uuid.UUID("3b8f2a34-8a59-4f5e-9d0e-7c2b1f6a9e41")

#: Fields of the stored snapshot that are bookkeeping, not part of the API's escrow.
INTERNAL_SNAPSHOT_FIELDS = ("recentCommands",)

IDEMPOTENCY_KEY_LENGTH_MAX = 200
#: How long a request waits for its in-flight twin (same key) before answering 409.
IN_FLIGHT_WAIT_S = 5.0


def public_snapshot(escrow: Escrow | dict[str, Any]) -> dict[str, Any]:
    data = escrow if isinstance(escrow, dict) else json.loads(escrow_table.dump(escrow))
    return {k: v for k, v in data.items() if k not in INTERNAL_SNAPSHOT_FIELDS}


def parse_wait(prefer: str | None) -> float | None:
    """Seconds from ``Prefer: wait=N`` (capped at 30), or None."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return max(0.0, min(WAIT_MAX_S, float(value)))
            except ValueError:
                raise Problem(400, "BAD_PREFER", "Prefer: wait=N needs a number") from None
    return None


def request_hash(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


class EscrowReader:
    """Reads an escrow and its commands' outcomes from the worker that owns it."""

    def __init__(
        self,
        app: faust.App,
        topics: Topics,
        escrows: TableT[str, Any],
        outcomes: TableT[str, Any],
        internal_secret: str,
        clock: Clock,
    ) -> None:
        self._app = app
        self._topics = topics
        self._escrows = escrows
        self._outcomes = outcomes
        self._internal_secret = internal_secret
        self._clock = clock

    def _owner(self, escrow_id: str) -> str | None:
        """The owner's base URL, or None when it is this worker."""
        try:
            url = self._app.router.external_topic_key_store(
                self._topics.commands, escrow_id.encode()
            )
        except (KeyError, TypeError):  # no assignment known yet (starting or rebalancing)
            raise Problem(503, "NOT_READY", "partitions are being assigned; retry") from None
        own = self._app.conf.canonical_url
        if (url.host, url.port) == (own.host, own.port):
            return None
        return str(url).rstrip("/")

    async def escrow(self, escrow_id: str, authorization: str) -> Escrow | None:
        owner = self._owner(escrow_id)
        if owner is None:
            return escrow_table.load(self._escrows.get(escrow_id))
        body = await self._remote(f"{owner}/api/escrow/{escrow_id}", authorization)
        return None if body is None else Escrow.model_validate(body)

    async def command_status(
        self, escrow_id: str, command_id: str, principal: Principal, authorization: str
    ) -> CommandStatus:
        """``GET …/commands/{id}``: read on the owner, authorized like the escrow."""
        owner = self._owner(escrow_id)
        if owner is not None:
            url = f"{owner}/api/escrow/{escrow_id}/commands/{command_id}"
            body = await self._remote(url, authorization)
            if body is None:
                raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
            return CommandStatus.model_validate(body)
        escrow = escrow_table.load(self._escrows.get(escrow_id))
        if escrow is not None:
            if not may_read(principal, escrow):
                raise Problem(403, "NOT_AUTHORIZED", "only the parties and admins see an escrow")
            return self.local_status(escrow_id, command_id, None)
        sender = None if principal.role is Role.ADMIN else principal.sub
        status = self.local_status(escrow_id, command_id, None, sender_id=sender)
        if status.status == "PENDING":
            raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
        return status

    async def status(self, escrow_id: str, command: Command, authorization: str) -> CommandStatus:
        owner = self._owner(escrow_id)
        if owner is not None:
            url = f"{owner}/api/escrow/{escrow_id}/commands/{command.command_id}"
            body = await self._remote(url, authorization)
            return CommandStatus.model_validate(
                body
                or {"escrowId": escrow_id, "commandId": command.command_id, "status": "PENDING"}
            )
        return self.local_status(escrow_id, command.command_id, handling.record_key(command))

    def local_status(
        self,
        escrow_id: str,
        command_id: str,
        record_key: str | None,
        sender_id: str | None = None,
    ) -> CommandStatus:
        """The outcome of a command of an escrow this worker owns; with ``sender_id``, a
        recorded outcome counts only when that user sent the command."""
        escrow = escrow_table.load(self._escrows.get(escrow_id))
        if escrow is not None and any(r.command_id == command_id for r in escrow.recent_commands):
            return CommandStatus(
                escrow_id=escrow_id,
                command_id=command_id,
                status="ACCEPTED",
                escrow=public_snapshot(escrow),
            )
        recorded = self._outcomes.get(escrow_id)
        for entry in (recorded or {}).get("entries", []):
            key = entry["key"]
            parts = key.split("|")
            if sender_id is not None and parts[-1] != sender_id:
                continue
            if key == record_key or (record_key is None and parts[0] == command_id):
                rejection = entry.get("rejection")
                if rejection is None:
                    return CommandStatus(escrow_id=escrow_id, command_id=command_id, status="NO_OP")
                return CommandStatus(
                    escrow_id=escrow_id,
                    command_id=command_id,
                    status="REJECTED",
                    code=rejection["code"],
                    message=rejection["message"],
                )
        return CommandStatus(escrow_id=escrow_id, command_id=command_id, status="PENDING")

    async def _remote(self, url: str, authorization: str) -> dict[str, Any] | None:
        """GET from the owning worker as the caller, signed as a worker-to-worker request
        (exempt from the public rate limits, which the caller already passed here)."""
        timeout = ClientTimeout(total=ROUTED_READ_TIMEOUT_S)
        headers = {"Authorization": authorization} | internal_headers(
            self._internal_secret, "GET", URL(url).raw_path_qs, self._clock().timestamp()
        )
        async with (
            ClientSession(timeout=timeout) as session,
            session.get(url, headers=headers) as response,
        ):
            if response.status == 404:
                return None
            body = await response.json(content_type=None)
            if response.status != 200:
                raise Problem(response.status, body.get("code", "UPSTREAM"), body.get("detail", ""))
            return dict(body)


class Gateway:
    """Everything the views need, built once by the composition root."""

    #: Checks a command's evidenceKeys before acceptance; installed by web/evidence.py.
    check_evidence: Callable[[Command], Awaitable[None]] | None = None
    #: Applies Stripe's ``account.updated`` to payout accounts; installed by web/payouts.py.
    on_account_updated: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        clock: Clock,
        new_id: Callable[[], str],
        reader: EscrowReader,
        database: Database,
        idempotency: IdempotencyStore,
        publisher: OutboxPublisher,
        limiter: RateLimiter,
        kyc: KycDirectory,
    ) -> None:
        self.app = app
        self.settings = settings
        self.clock = clock
        self.new_id = new_id
        self.reader = reader
        self.database = database
        self.idempotency = idempotency
        self.publisher = publisher
        self.limiter = limiter
        self.kyc = kyc
        self.jwt_secret = settings.jwt_secret.get_secret_value()
        self.internal_secret = settings.internal_command_secret.get_secret_value()

    # -- steps 1-5 ------------------------------------------------------------------

    async def principal(self, request: Request) -> Principal:
        """The authenticated caller, counted against the per-user limit of escrow routes
        (once: not again when another worker forwards the caller's request here)."""
        now = self.clock()
        principal = authenticate(request.headers.get("Authorization"), self.jwt_secret, now)
        if not cast(Any, request).get(INTERNAL_REQUEST_KEY):  # aiohttp's request mapping
            await self.limiter.check_user(principal.sub, now)
        return principal

    async def body(self, request: Request, model: type[BaseModel]) -> tuple[BaseModel, bytes]:
        raw = await request.read()
        if len(raw) > self.settings.http_body_max_bytes:
            raise Problem(
                413,
                "PAYLOAD_TOO_LARGE",
                f"the body is larger than {self.settings.http_body_max_bytes} bytes",
            )
        if raw.strip() == b"" and model is EmptyBody:
            return EmptyBody(), raw
        if (
            request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            != "application/json"
        ):
            raise Problem(415, "UNSUPPORTED_MEDIA_TYPE", "send application/json")
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise Problem(400, "INVALID_JSON", f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Problem(400, "INVALID_JSON", "the body must be a JSON object")
        try:
            return model.model_validate(data, context={"wire": True}), raw
        except ValidationError as exc:
            raise Problem(
                422,
                "VALIDATION_FAILED",
                "the body is invalid",
                errors=validation_errors(exc),  # names the field of cross-field rules too
            ) from None

    def command(
        self,
        principal: Principal,
        type_: str,
        escrow_id: str,
        payload: dict[str, Any],
        idempotency_key: str | None,
    ) -> Command:
        if idempotency_key:
            command_id = str(
                uuid.uuid5(COMMAND_ID_NAMESPACE, f"{principal.sub}\n{idempotency_key}")
            )
        else:
            command_id = self.new_id()
        actor = {"id": principal.sub, "role": principal.role.value}
        return self.build_command(actor, type_, escrow_id, payload, command_id)

    def build_command(  # also for trusted producers: webhooks' commands are signed on enqueue
        self,
        actor: dict[str, str],
        type_: str,
        escrow_id: str,
        payload: dict[str, Any],
        command_id: str,
    ) -> Command:
        try:
            return make_command(actor, type_, escrow_id, payload, command_id, self.clock())
        except CommandInvalid as exc:
            raise Problem(
                422,
                "VALIDATION_FAILED",
                str(exc),
                errors=[{"field": e["field"], "message": e["message"]} for e in exc.errors],
            ) from None

    async def accept(
        self,
        view: View,
        request: Request,
        principal: Principal,
        command: Command,
        created: bool,
        raw_body: bytes,
        check: Callable[[], Awaitable[None]] | None = None,
    ) -> Response:
        """Steps 2-5 of the module docstring for a validated command."""
        wait_s = parse_wait(request.headers.get("Prefer"))
        accepted = Accepted(escrow_id=command.escrow_id, command_id=command.command_id)
        accepted_body = accepted.model_dump(by_alias=True)
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            if not key.strip() or len(key) > IDEMPOTENCY_KEY_LENGTH_MAX:
                raise Problem(
                    400,
                    "INVALID_IDEMPOTENCY_KEY",
                    f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_LENGTH_MAX} characters",
                )
            digest = request_hash(request.method, request.url.path, raw_body)
            begun = await self.begin_idempotent(principal.sub, key, digest)
            if begun.kind is BeginKind.MISMATCH:
                raise Problem(
                    422,
                    "IDEMPOTENCY_KEY_REUSED",
                    "this Idempotency-Key was used with a different request",
                )
            if begun.kind is BeginKind.CONFLICT_IN_FLIGHT:
                raise Problem(
                    409,
                    "IDEMPOTENCY_IN_FLIGHT",
                    "a request with this Idempotency-Key is still being processed",
                )
            if begun.kind is BeginKind.REPLAY:
                return json_response(
                    view, begun.body, begun.status or 202, {"Idempotent-Replayed": "true"}
                )
        try:
            if check is not None:
                await check()
            await self.enqueue(principal.sub, key, command, accepted_body)
        except BaseException:
            if key is not None:
                await self.idempotency.abandon(principal.sub, key)
            raise
        if wait_s is None:
            return json_response(view, accepted.model_dump(by_alias=True), 202)
        status = await self.wait(request, command, wait_s)
        headers = {"Preference-Applied": f"wait={wait_s:g}"}
        if status.status == "ACCEPTED":
            return json_response(view, status.escrow or {}, 201 if created else 200, headers)
        if status.status == "REJECTED" and status.code:
            raise rejection_problem(RejectionCode(status.code), status.message or "")
        if status.status == "NO_OP":
            escrow = await self.reader.escrow(command.escrow_id, _auth(request))
            return json_response(view, public_snapshot(escrow) if escrow else {}, 200, headers)
        return json_response(view, accepted.model_dump(by_alias=True), 202, headers)

    async def require_kyc(self, *user_ids: str) -> None:
        """With FEATURE_KYC_GATING, every party must be VERIFIED (SPEC §5): else 403."""
        if not self.settings.feature_kyc_gating:
            return
        wanted = frozenset(user_ids)
        missing = sorted(wanted - await self.kyc.verified(wanted))
        if missing:
            raise Problem(
                403, "KYC_REQUIRED", f"KYC verification required for: {', '.join(missing)}"
            )

    async def begin_idempotent(self, user_id: str, key: str, digest: str) -> Begin:
        """Begin; a twin request still in flight is waited for (bounded), then replayed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IN_FLIGHT_WAIT_S
        while True:
            begun = await self.idempotency.begin(user_id, key, digest, self.clock())
            if begun.kind is not BeginKind.CONFLICT_IN_FLIGHT or loop.time() >= deadline:
                return begun
            await asyncio.sleep(WAIT_POLL_S)

    async def enqueue(
        self,
        user_id: str,
        key: str | None,
        command: Command,
        accepted_body: dict[str, Any],
        status: int = 202,
    ) -> None:
        """Step 4: outbox row and idempotency record in one transaction, then wake the relay.

        System commands (webhooks) are signed here, over the exact bytes that are sent.
        """
        body = encode_command(command)
        headers = (
            signature_headers(self.internal_secret, body)
            if command.actor.role is ActorRole.SYSTEM
            else []
        )
        pool = await self.database.pool()
        async with pool.acquire() as conn, conn.transaction():
            await outbox.enqueue(
                conn,
                self.settings.kafka_commands_topic,
                command.escrow_id,
                body,
                headers,
                command.escrow_id,
            )
            stored = key is not None and await self.idempotency.complete_in(
                conn, user_id, key, status, accepted_body
            )
        if key is not None and not stored:
            await self.idempotency.complete(user_id, key, status, accepted_body)
        self.publisher.notify()

    async def wait(self, request: Request, command: Command, wait_s: float) -> CommandStatus:
        """Poll the command's outcome until it is known or ``wait_s`` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        pending = CommandStatus(
            escrow_id=command.escrow_id, command_id=command.command_id, status="PENDING"
        )
        while True:
            try:
                status = await self.reader.status(command.escrow_id, command, _auth(request))
            except Problem as problem:
                if problem.status != 503:  # partitions being assigned: keep waiting
                    raise
                status = pending
            if status.status != "PENDING" or loop.time() >= deadline:
                return status
            await asyncio.sleep(WAIT_POLL_S)

    async def existing(self, request: Request, escrow_id: str) -> Escrow:
        escrow = await self.reader.escrow(escrow_id, _auth(request))
        if escrow is None:
            raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
        return escrow


def _auth(request: Request) -> str:
    return request.headers.get("Authorization", "")


def json_response(
    view: View, body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return view.json(body, status=status, headers=headers)


def is_party(principal: Principal, escrow: Escrow | dict[str, Any]) -> bool:
    buyer = escrow["buyerId"] if isinstance(escrow, dict) else escrow.buyer_id
    seller = escrow["sellerId"] if isinstance(escrow, dict) else escrow.seller_id
    return principal.role is Role.USER and principal.sub in (buyer, seller)


def may_read(principal: Principal, escrow: Escrow | dict[str, Any]) -> bool:
    return principal.role is Role.ADMIN or is_party(principal, escrow)


#: POST actions on an existing escrow: path suffix → (command type, body model).
ACTIONS: dict[str, tuple[str, type[BaseModel]]] = {
    "deliver": ("MarkDelivered", DeliverBody),
    "release": ("ReleaseFunds", EmptyBody),
    "cancel": ("CancelEscrow", EmptyBody),
    "dispute": ("RaiseDispute", DisputeBody),
    "dispute/resolve": ("ResolveDispute", ResolveBody),
    "refund": ("RefundEscrow", RefundBody),
}
MILESTONE_ACTIONS = {"deliver": "DeliverMilestone", "release": "ReleaseMilestone"}

CANCEL_REASON = {"buyer": "BUYER_CANCELLED", "seller": "SELLER_CANCELLED"}


def cancel_reason(principal: Principal, escrow: Escrow) -> str:
    if principal.role is Role.ADMIN:
        return "ADMIN"
    if principal.sub == escrow.buyer_id:
        return CANCEL_REASON["buyer"]
    return CANCEL_REASON["seller"]


def encode_cursor(created_at: datetime, escrow_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), escrow_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, escrow_id = json.loads(raw)
        return datetime.fromisoformat(stamp), str(escrow_id)
    except (ValueError, TypeError, RecursionError):
        raise Problem(400, "INVALID_CURSOR", "the cursor is not one this API issued") from None


def register(app: faust.App, gateway: Gateway, topics: Topics) -> None:
    """Register the API's views on ``app``."""

    rules = domain_settings(gateway.settings)

    def authorize_action(principal: Principal, escrow: Escrow, command: Command) -> None:
        refusal = check_sender_authorized(escrow, command)
        if refusal is not None:
            raise rejection_problem(refusal.code, refusal.message)

    @app.page("/api/escrow")
    class EscrowCollection(View):
        async def post(self, request: Request) -> Response:
            principal = await gateway.principal(request)
            body, raw = await gateway.body(request, CreateEscrowBody)
            assert isinstance(body, CreateEscrowBody)
            if principal.role is Role.ADMIN:
                raise Problem(403, "NOT_AUTHORIZED", "escrows are created by buyers or services")
            refused = body.refused_payout_fields(is_service=principal.role is Role.SERVICE)
            if refused:
                raise Problem(
                    422,
                    "VALIDATION_FAILED",
                    f"{', '.join(refused)}: payouts go to the seller's payout account, and "
                    "only a service may set the fee",
                    errors=[
                        {"field": f, "message": "not accepted from this caller"} for f in refused
                    ],
                )
            limit = max_amount_for_rail(rules, body.rail, body.currency)
            if body.amount > limit:
                raise Problem(
                    422,
                    "VALIDATION_FAILED",
                    f"amount exceeds the maximum for rail {body.rail.value}",
                    errors=[{"field": "amount", "message": f"at most {limit} minor units"}],
                )
            payload = body.model_dump(mode="json", by_alias=True, exclude_none=True)
            if principal.role is Role.USER:
                if body.buyer_id not in (None, principal.sub):
                    raise Problem(403, "NOT_AUTHORIZED", "a user creates escrows as the buyer")
                payload["buyerId"] = principal.sub
            elif body.buyer_id is None:
                raise Problem(
                    422,
                    "VALIDATION_FAILED",
                    "a service must name the buyerId",
                    errors=[{"field": "buyerId", "message": "required"}],
                )
            key = request.headers.get("Idempotency-Key")
            escrow_id = (
                str(uuid.uuid5(COMMAND_ID_NAMESPACE, f"escrow\n{principal.sub}\n{key}"))
                if key
                else gateway.new_id()
            )
            command = gateway.command(principal, "CreateEscrow", escrow_id, payload, key)

            async def kyc_check() -> None:
                await gateway.require_kyc(payload["buyerId"], payload["sellerId"])

            return await gateway.accept(
                self, request, principal, command, created=True, raw_body=raw, check=kyc_check
            )

        async def get(self, request: Request) -> Response:
            principal = await gateway.principal(request)
            if principal.role is Role.SERVICE:
                raise Problem(403, "NOT_AUTHORIZED", "services do not list escrows")
            q = request.query
            try:
                limit = min(PAGE_SIZE_MAX, max(1, int(q.get("limit", PAGE_SIZE_DEFAULT))))
            except ValueError:
                raise Problem(400, "INVALID_QUERY", "limit must be an integer") from None
            role_filter = q.get("role")
            if role_filter not in (None, "buyer", "seller"):
                raise Problem(400, "INVALID_QUERY", "role must be buyer or seller")
            conditions: list[str] = []
            args: list[Any] = []

            def arg(value: Any) -> str:
                args.append(value)
                return f"${len(args)}"

            if principal.role is Role.USER:
                me = arg(principal.sub)
                if role_filter == "buyer":
                    conditions.append(f"buyer_id = {me}")
                elif role_filter == "seller":
                    conditions.append(f"seller_id = {me}")
                else:
                    conditions.append(f"(buyer_id = {me} OR seller_id = {me})")
            for name, column in (("status", "status"), ("rail", "rail")):
                if q.get(name):
                    conditions.append(f"{column} = {arg(q[name])}")
            if q.get("cursor"):
                created_at, escrow_id = decode_cursor(q["cursor"])
                conditions.append(f"(created_at, id) < ({arg(created_at)}, {arg(escrow_id)})")
            where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
            pool = await gateway.database.pool()
            rows = await pool.fetch(
                f"SELECT id, created_at, snapshot FROM escrows {where} "
                f"ORDER BY created_at DESC, id DESC LIMIT {arg(limit + 1)}",
                *args,
            )
            page = rows[:limit]
            cursor = (
                encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
            )
            body = EscrowPage(
                items=[public_snapshot(r["snapshot"]) for r in page], next_cursor=cursor
            )
            return json_response(self, body.model_dump(by_alias=True))

    @app.page("/api/escrow/{escrow_id}")
    class EscrowItem(View):
        async def get(self, request: Request, escrow_id: str) -> Response:
            principal = await gateway.principal(request)
            # the owner (this worker or, signed, another) answers as the caller: 404 / 403
            escrow = await gateway.reader.escrow(escrow_id, _auth(request))
            if escrow is None:
                raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
            if not may_read(principal, escrow):
                raise Problem(403, "NOT_AUTHORIZED", "only the parties and admins see an escrow")
            return json_response(self, public_snapshot(escrow))

    @app.page("/api/escrow/{escrow_id}/commands/{command_id}")
    class CommandItem(View):
        async def get(self, request: Request, escrow_id: str, command_id: str) -> Response:
            """Authorized like GET /api/escrow/{id}; a command whose escrow does not exist
            (a refused create) is visible to its sender and admins only, else 404."""
            principal = await gateway.principal(request)
            status = await gateway.reader.command_status(
                escrow_id, command_id, principal, _auth(request)
            )
            return json_response(self, status.model_dump(by_alias=True))

    @app.page("/api/escrow/{escrow_id}/events")
    class EscrowEvents(View):
        async def get(self, request: Request, escrow_id: str) -> Response:
            principal = await gateway.principal(request)
            pool = await gateway.database.pool()
            row = await pool.fetchrow(
                "SELECT buyer_id, seller_id FROM escrows WHERE id = $1", escrow_id
            )
            if row is None:
                raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
            parties = {"buyerId": row["buyer_id"], "sellerId": row["seller_id"]}
            if not may_read(principal, parties):
                raise Problem(403, "NOT_AUTHORIZED", "only the parties and admins see history")
            rows = await pool.fetch(
                "SELECT event_id, event_type, version, occurred_at, causation_id, data "
                "FROM escrow_events WHERE escrow_id = $1 ORDER BY version",
                escrow_id,
            )
            events = [
                {
                    "eventId": str(r["event_id"]),
                    "type": r["event_type"],
                    "version": r["version"],
                    "occurredAt": r["occurred_at"].isoformat(),
                    "causationId": r["causation_id"],
                    "data": r["data"],
                }
                for r in rows
            ]
            return json_response(
                self, EscrowHistory(escrow_id=escrow_id, events=events).model_dump(by_alias=True)
            )

    def action_view(suffix: str, command_type: str, model: type[BaseModel]) -> type[View]:
        class Action(View):
            async def post(self, request: Request, escrow_id: str, **path: str) -> Response:
                principal = await gateway.principal(request)
                body, raw = await gateway.body(request, model)
                escrow = await gateway.existing(request, escrow_id)
                payload = body.model_dump(mode="json", by_alias=True, exclude_none=True)
                if command_type == "CancelEscrow":
                    payload = {"reason": cancel_reason(principal, escrow)}
                if "milestone_id" in path:
                    payload = {"milestoneId": path["milestone_id"]}
                key = request.headers.get("Idempotency-Key")
                command = gateway.command(principal, command_type, escrow_id, payload, key)

                async def check() -> None:
                    authorize_action(principal, escrow, command)
                    if gateway.check_evidence is not None:
                        await gateway.check_evidence(command)
                    if is_release_path(command.type, getattr(command.payload, "resolution", None)):
                        await gateway.require_kyc(escrow.buyer_id, escrow.seller_id)

                return await gateway.accept(
                    self, request, principal, command, created=False, raw_body=raw, check=check
                )

        Action.__name__ = f"Action_{command_type}"
        return Action

    @app.page("/api/kyc/{user_id}")
    class Kyc(View):
        async def get(self, request: Request, user_id: str) -> Response:
            principal = await gateway.principal(request)
            if principal.role is Role.USER and principal.sub != user_id:
                raise Problem(403, "NOT_AUTHORIZED", "users see only their own KYC status")
            status = await gateway.kyc.status(user_id) or "UNKNOWN"
            return json_response(
                self, KycStatus(user_id=user_id, status=status).model_dump(by_alias=True)
            )

        async def put(self, request: Request, user_id: str) -> Response:
            principal = await gateway.principal(request)
            if principal.role not in (Role.ADMIN, Role.SERVICE):
                raise Problem(403, "NOT_AUTHORIZED", "KYC status is set by admins and services")
            body, _ = await gateway.body(request, KycBody)
            assert isinstance(body, KycBody)
            await gateway.kyc.set_status(user_id, body.status, updated_by=principal.sub)
            record = KycStatus(user_id=user_id, status=body.status)
            return json_response(self, record.model_dump(by_alias=True))

    for suffix, (command_type, model) in ACTIONS.items():
        app.page(f"/api/escrow/{{escrow_id}}/{suffix}")(action_view(suffix, command_type, model))
    for suffix, command_type in MILESTONE_ACTIONS.items():
        app.page(f"/api/escrow/{{escrow_id}}/milestones/{{milestone_id}}/{suffix}")(
            action_view(suffix, command_type, EmptyBody)
        )
