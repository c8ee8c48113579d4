"""The escrow API (SPEC §4) and the KYC views, as Faust views.

Accepting a command (every ``POST``), in order:

1. Authenticate; parse and validate the body (``web/gateway.py``: 400, 413, 415, 422).
2. Build the command: its commandId (and a new escrow's id) derived from the user and the
   ``Idempotency-Key`` when one is given (``intake.command_id_for``), so a retry is the same
   command; the key itself must be 1-200 characters (400).
3. ``intake.accept`` with this view's check: the domain's authorization rule against the
   escrow as its owning worker holds it (403 / 404), the evidence keys, KYC of the parties
   (403) — then the outbox row and the idempotency record commit together.  A replay
   answers the stored response; the key reused with another body is 422
   ``IDEMPOTENCY_KEY_REUSED``, one still in flight 409.
4. 202, or with ``Prefer: wait=N`` (N ≤ 30): the command's outcome from the owning worker
   (``web/reads.py``): 201/200 with the escrow, the rejection as a problem, or 202 when N
   runs out.

Reads: ``GET /api/escrow/{id}`` and a command's status come from the owning worker's tables
(``web/reads.py``); the list and the history read the PostgreSQL mirror (``db/queries.py``:
eventually consistent, trailing the tables by the mirror's batch delay).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import faust
from faust.web import Request, Response, View
from pydantic import BaseModel

from escrow_stream.db import queries
from escrow_stream.db.kyc import KycDirectory
from escrow_stream.db.pool import Database
from escrow_stream.domain import Command, Escrow, RejectionCode, is_release_path
from escrow_stream.domain.guards import check_sender_authorized, max_amount_for_rail
from escrow_stream.domain.settings import DomainSettings
from escrow_stream.intake import (
    IdempotencyKey,
    Intake,
    Receipt,
    Verdict,
    command_id_for,
    escrow_id_for,
)
from escrow_stream.web.auth import Principal, Role
from escrow_stream.web.gateway import (
    Gateway,
    authorization,
    build_command,
    json_response,
    may_read,
    parse_wait,
    request_hash,
)
from escrow_stream.web.problems import Problem, rejection_problem
from escrow_stream.web.reads import EscrowReader, public_snapshot
from escrow_stream.web.schemas import (
    Accepted,
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

PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 200
IDEMPOTENCY_KEY_LENGTH_MAX = 200

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


@dataclass(frozen=True)
class EscrowApi:
    """What the escrow views act through, wired by the composition root."""

    gateway: Gateway
    reader: EscrowReader
    intake: Intake
    database: Database
    kyc: KycDirectory
    rules: DomainSettings
    kyc_gating: bool
    new_id: Callable[[], str]
    #: checks a command's evidenceKeys before acceptance (``web/evidence.check_evidence``)
    check_evidence: Callable[[Command], Awaitable[None]]

    async def require_kyc(self, *user_ids: str) -> None:
        """With FEATURE_KYC_GATING, every party must be VERIFIED (SPEC §5): else 403."""
        if not self.kyc_gating:
            return
        wanted = frozenset(user_ids)
        missing = sorted(wanted - await self.kyc.verified(wanted))
        if missing:
            raise Problem(
                403, "KYC_REQUIRED", f"KYC verification required for: {', '.join(missing)}"
            )

    def command(
        self, principal: Principal, type_: str, escrow_id: str, payload: dict[str, Any], key: str
    ) -> Command:
        """Step 2: the caller's command (``key``: the Idempotency-Key, "" when none)."""
        command_id = command_id_for(principal.sub, key) if key else self.new_id()
        actor = {"id": principal.sub, "role": principal.role.value}
        return build_command(actor, type_, escrow_id, payload, command_id, self.gateway.clock())


def cancel_reason(principal: Principal, escrow: Escrow) -> str:
    if principal.role is Role.ADMIN:
        return "ADMIN"
    if principal.sub == escrow.buyer_id:
        return CANCEL_REASON["buyer"]
    return CANCEL_REASON["seller"]


def idempotency_key(request: Request, principal: Principal, raw: bytes) -> IdempotencyKey | None:
    """The request's ``Idempotency-Key`` (400 unless 1-200 characters), or None."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not key.strip() or len(key) > IDEMPOTENCY_KEY_LENGTH_MAX:
        raise Problem(
            400,
            "INVALID_IDEMPOTENCY_KEY",
            f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_LENGTH_MAX} characters",
        )
    digest = request_hash(request.method, request.url.path, raw)
    return IdempotencyKey(principal.sub, key, digest)


def refusal(view: View, receipt: Receipt) -> Response:
    """A keyed request that was not accepted now: the replayed answer, or 422 / 409."""
    if receipt.verdict is Verdict.REPLAYED:
        headers = {"Idempotent-Replayed": "true"}
        return json_response(view, receipt.body, receipt.status or 202, headers)
    if receipt.verdict is Verdict.KEY_REUSED:
        raise Problem(
            422, "IDEMPOTENCY_KEY_REUSED", "this Idempotency-Key was used with a different request"
        )
    raise Problem(
        409, "IDEMPOTENCY_IN_FLIGHT", "a request with this Idempotency-Key is still being processed"
    )


class ApiView(View):
    """A view bound to one app's :class:`EscrowApi` (see :func:`bind`)."""

    api: ClassVar[EscrowApi]

    async def accept(
        self,
        request: Request,
        principal: Principal,
        command: Command,
        raw: bytes,
        check: Callable[[], Awaitable[None]],
        created: bool = False,
    ) -> Response:
        """Steps 3-4 of the module docstring for a validated command."""
        wait_s = parse_wait(request.headers.get("Prefer"))
        answer = Accepted(escrow_id=command.escrow_id, command_id=command.command_id)
        body = answer.model_dump(by_alias=True)
        key = idempotency_key(request, principal, raw)
        receipt = await self.api.intake.accept(command, body, key=key, check=check)
        if receipt.verdict is not Verdict.ACCEPTED:
            return refusal(self, receipt)
        if wait_s is None:
            return json_response(self, body, 202)
        return await self.waited(request, command, wait_s, created, body)

    async def waited(
        self, request: Request, command: Command, wait_s: float, created: bool, body: Any
    ) -> Response:
        """Step 4 with ``Prefer: wait``."""
        auth = authorization(request)
        status = await self.api.reader.wait(command, wait_s, auth)
        headers = {"Preference-Applied": f"wait={wait_s:g}"}
        if status.status == "ACCEPTED":
            return json_response(self, status.escrow or {}, 201 if created else 200, headers)
        if status.status == "REJECTED" and status.code:
            raise rejection_problem(RejectionCode(status.code), status.message or "")
        if status.status == "NO_OP":
            escrow = await self.api.reader.escrow(command.escrow_id, auth)
            return json_response(self, public_snapshot(escrow) if escrow else {}, 200, headers)
        return json_response(self, body, 202, headers)


def create_payload(
    principal: Principal, body: CreateEscrowBody, rules: DomainSettings
) -> dict[str, Any]:
    """CreateEscrow's payload from the body as this caller may send it (403 / 422)."""
    if principal.role is Role.ADMIN:
        raise Problem(403, "NOT_AUTHORIZED", "escrows are created by buyers or services")
    refused = body.refused_payout_fields(is_service=principal.role is Role.SERVICE)
    if refused:
        raise Problem(
            422,
            "VALIDATION_FAILED",
            f"{', '.join(refused)}: payouts go to the seller's payout account, and "
            "only a service may set the fee",
            errors=[{"field": f, "message": "not accepted from this caller"} for f in refused],
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
    return payload


def escrow_filter(principal: Principal, query: Any) -> tuple[queries.EscrowFilter, int]:
    """The list's filter and page size from the query string (400)."""
    try:
        limit = min(PAGE_SIZE_MAX, max(1, int(query.get("limit", PAGE_SIZE_DEFAULT))))
    except ValueError:
        raise Problem(400, "INVALID_QUERY", "limit must be an integer") from None
    role = query.get("role")
    if role not in (None, "buyer", "seller"):
        raise Problem(400, "INVALID_QUERY", "role must be buyer or seller")
    mine = principal.role is Role.USER
    where = queries.EscrowFilter(
        viewer=principal.sub if mine else None,
        role=role if mine else None,
        status=query.get("status") or None,
        rail=query.get("rail") or None,
    )
    return where, limit


class EscrowCollection(ApiView):
    async def post(self, request: Request) -> Response:
        principal = await self.api.gateway.principal(request)
        body, raw = await self.api.gateway.body(request, CreateEscrowBody)
        assert isinstance(body, CreateEscrowBody)
        payload = create_payload(principal, body, self.api.rules)
        key = request.headers.get("Idempotency-Key")
        escrow_id = escrow_id_for(principal.sub, key) if key else self.api.new_id()
        command = self.api.command(principal, "CreateEscrow", escrow_id, payload, key or "")

        async def kyc_check() -> None:
            await self.api.require_kyc(payload["buyerId"], payload["sellerId"])

        return await self.accept(request, principal, command, raw, kyc_check, created=True)

    async def get(self, request: Request) -> Response:
        principal = await self.api.gateway.principal(request)
        if principal.role is Role.SERVICE:
            raise Problem(403, "NOT_AUTHORIZED", "services do not list escrows")
        where, limit = escrow_filter(principal, request.query)
        pool = await self.api.database.pool()
        try:
            snapshots, cursor = await queries.escrow_page(
                pool, where, limit, request.query.get("cursor")
            )
        except queries.InvalidCursor:
            raise Problem(400, "INVALID_CURSOR", "the cursor is not one this API issued") from None
        page = EscrowPage(items=[public_snapshot(s) for s in snapshots], next_cursor=cursor)
        return json_response(self, page.model_dump(by_alias=True))


class EscrowItem(ApiView):
    async def get(self, request: Request, escrow_id: str) -> Response:
        principal = await self.api.gateway.principal(request)
        # the owner (this worker or, signed, another) answers as the caller: 404 / 403
        snapshot = await self.api.reader.public(escrow_id, authorization(request))
        if snapshot is None:
            raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
        if not may_read(principal, snapshot):
            raise Problem(403, "NOT_AUTHORIZED", "only the parties and admins see an escrow")
        return json_response(self, snapshot)


class CommandItem(ApiView):
    async def get(self, request: Request, escrow_id: str, command_id: str) -> Response:
        """Authorized like GET /api/escrow/{id}; a command whose escrow does not exist
        (a refused create) is visible to its sender and admins only, else 404."""
        principal = await self.api.gateway.principal(request)
        status = await self.api.reader.command_status(
            escrow_id, command_id, principal, authorization(request)
        )
        return json_response(self, status.model_dump(by_alias=True))


class EscrowEvents(ApiView):
    async def get(self, request: Request, escrow_id: str) -> Response:
        principal = await self.api.gateway.principal(request)
        pool = await self.api.database.pool()
        parties = await queries.escrow_parties(pool, escrow_id)
        if parties is None:
            raise Problem(404, "NOT_FOUND", f"escrow {escrow_id} not found")
        if not may_read(principal, parties):
            raise Problem(403, "NOT_AUTHORIZED", "only the parties and admins see history")
        events = await queries.escrow_history(pool, escrow_id)
        history = EscrowHistory(escrow_id=escrow_id, events=events)
        return json_response(self, history.model_dump(by_alias=True))


class EscrowAction(ApiView):
    """``POST /api/escrow/{id}/{action}`` (and a milestone's): one command on the escrow."""

    command_type: ClassVar[str]
    model: ClassVar[type[BaseModel]]

    async def post(self, request: Request, escrow_id: str, **path: str) -> Response:
        principal = await self.api.gateway.principal(request)
        body, raw = await self.api.gateway.body(request, self.model)
        escrow = await self.api.reader.existing(escrow_id, authorization(request))
        payload = body.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.command_type == "CancelEscrow":
            payload = {"reason": cancel_reason(principal, escrow)}
        if "milestone_id" in path:
            payload = {"milestoneId": path["milestone_id"]}
        key = request.headers.get("Idempotency-Key") or ""
        command = self.api.command(principal, self.command_type, escrow_id, payload, key)

        async def check() -> None:
            refused = check_sender_authorized(escrow, command)
            if refused is not None:
                raise rejection_problem(refused.code, refused.message)
            await self.api.check_evidence(command)
            if is_release_path(command.type, getattr(command.payload, "resolution", None)):
                await self.api.require_kyc(escrow.buyer_id, escrow.seller_id)

        return await self.accept(request, principal, command, raw, check)


class Kyc(ApiView):
    async def get(self, request: Request, user_id: str) -> Response:
        principal = await self.api.gateway.principal(request)
        if principal.role is Role.USER and principal.sub != user_id:
            raise Problem(403, "NOT_AUTHORIZED", "users see only their own KYC status")
        status = await self.api.kyc.status(user_id) or "UNKNOWN"
        record = KycStatus(user_id=user_id, status=status)
        return json_response(self, record.model_dump(by_alias=True))

    async def put(self, request: Request, user_id: str) -> Response:
        principal = await self.api.gateway.principal(request)
        if principal.role not in (Role.ADMIN, Role.SERVICE):
            raise Problem(403, "NOT_AUTHORIZED", "KYC status is set by admins and services")
        body, _ = await self.api.gateway.body(request, KycBody)
        assert isinstance(body, KycBody)
        await self.api.kyc.set_status(user_id, body.status, updated_by=principal.sub)
        record = KycStatus(user_id=user_id, status=body.status)
        return json_response(self, record.model_dump(by_alias=True))


def bind(view: type[ApiView], api: EscrowApi, name: str | None = None, **attrs: Any) -> type[View]:
    """``view`` for one app: a subclass holding its ``api`` (Faust names each page class)."""
    return cast(type[View], type(name or view.__name__, (view,), {"api": api, **attrs}))


def routes(api: EscrowApi) -> list[tuple[str, type[View]]]:
    """Every path of this module with its view bound to ``api``."""
    pages: list[tuple[str, type[View]]] = [
        ("/api/escrow", bind(EscrowCollection, api)),
        ("/api/escrow/{escrow_id}", bind(EscrowItem, api)),
        ("/api/escrow/{escrow_id}/commands/{command_id}", bind(CommandItem, api)),
        ("/api/escrow/{escrow_id}/events", bind(EscrowEvents, api)),
        ("/api/kyc/{user_id}", bind(Kyc, api)),
    ]
    actions = [(f"{{escrow_id}}/{s}", t, m) for s, (t, m) in ACTIONS.items()] + [
        (f"{{escrow_id}}/milestones/{{milestone_id}}/{s}", t, EmptyBody)
        for s, t in MILESTONE_ACTIONS.items()
    ]
    for suffix, command_type, model in actions:
        view = bind(
            EscrowAction, api, f"Action_{command_type}", command_type=command_type, model=model
        )
        pages.append((f"/api/escrow/{suffix}", view))
    return pages


def register(app: faust.App, api: EscrowApi) -> None:
    """Register the escrow and KYC views on ``app``."""
    for path, view in routes(api):
        app.page(path)(view)
