"""Request and response bodies of the HTTP API: the models the handlers validate with and
the OpenAPI document is generated from.  Command bodies reuse the domain's payload models,
so the API and the Kafka commands can never disagree on a field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from escrow_stream.domain.payloads import (
    CreateEscrowPayload,
    MarkDeliveredPayload,
    RaiseDisputePayload,
    RefundEscrowPayload,
    ResolveDisputePayload,
)


class CreateEscrowBody(CreateEscrowPayload):
    """``POST /api/escrow``: a user becomes the buyer; a service names the buyer.

    Payout fields (``PAYOUT_FIELDS``) are refused with 422 (SPEC §10): a user sends none, a
    service only ``sellerFee`` (within ``[0, amount]``); the payout destination is the
    seller's payout account, the fee otherwise ``ESCROW_FEE_BPS``."""

    buyer_id: str | None = None  # type: ignore[assignment]

    def refused_payout_fields(self, is_service: bool) -> list[str]:
        """The payout fields this body carries that its sender may not set (JSON names)."""
        allowed = SERVICE_PAYOUT_FIELDS if is_service else frozenset()
        return [
            alias
            for name, alias in PAYOUT_FIELDS.items()
            if name in self.model_fields_set and name not in allowed
        ]


#: Create fields that decide who is paid or how much (field name → JSON name).
PAYOUT_FIELDS = {"seller_account_id": "sellerAccountId", "seller_fee": "sellerFee"}
#: The payout fields a service may set: the fee, within ``[0, amount]``.
SERVICE_PAYOUT_FIELDS = frozenset({"seller_fee"})


class DeliverBody(MarkDeliveredPayload):
    """``POST /api/escrow/{id}/deliver``."""


class DisputeBody(RaiseDisputePayload):
    """``POST /api/escrow/{id}/dispute``."""


class ResolveBody(ResolveDisputePayload):
    """``POST /api/escrow/{id}/dispute/resolve`` (admin)."""


class RefundBody(RefundEscrowPayload):
    """``POST /api/escrow/{id}/refund``."""


class EmptyBody(BaseModel):
    """Actions that take no input (release, cancel, milestone deliver/release)."""

    model_config = ConfigDict(extra="forbid")


class KycBody(BaseModel):
    """``PUT /api/kyc/{user_id}`` (admin, service): the user's verification status."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["PENDING", "VERIFIED", "REJECTED"]


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel)


class Accepted(_Out):
    """202: the command is durably accepted (in the outbox) and will be processed."""

    escrow_id: str
    command_id: str
    status: Literal["ACCEPTED"] = "ACCEPTED"


class CommandStatus(_Out):
    """The outcome of one command as the owning worker knows it."""

    escrow_id: str
    command_id: str
    status: Literal["PENDING", "ACCEPTED", "REJECTED", "NO_OP"]
    code: str | None = None
    message: str | None = None
    escrow: dict[str, Any] | None = None


class KycStatus(_Out):
    user_id: str
    status: Literal["PENDING", "VERIFIED", "REJECTED", "UNKNOWN"]


class PaymentInstructions(_Out):
    """``GET /api/escrow/{id}/payment`` (the buyer): how to pay.  STARTED: being created;
    FAILED: the provider refused (``errorCode``)."""

    escrow_id: str
    status: Literal["STARTED", "SUCCEEDED", "FAILED"]
    provider: str
    provider_payment_id: str | None = None
    client_secret: str | None = None
    deposit_address: str | None = None
    error_code: str | None = None


class EscrowPage(_Out):
    """A page of escrows from the PostgreSQL mirror, newest first."""

    items: list[dict[str, Any]]
    next_cursor: str | None = None


class EscrowHistory(_Out):
    """Every event of an escrow, oldest first, from the PostgreSQL mirror."""

    escrow_id: str
    events: list[dict[str, Any]]


class ProblemBody(BaseModel):
    """RFC 9457 problem details plus ``code`` and ``errors``."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    code: str
    errors: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: Literal["ok"]
    timestamp: str


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="kafka, postgres, redis: ok or the error")
