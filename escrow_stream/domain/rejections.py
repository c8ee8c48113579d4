"""Rejections: stable machine-readable codes and the rejection record of a refused command."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, NamedTuple

from ._model import DomainModel, Id, Text, Timestamp, TolerantModel
from .money import Currency, PositiveMinorUnits, Provider


class RejectionCode(StrEnum):
    """Why a command was refused (SPEC §2); stable, part of the public contract."""

    INVALID_TRANSITION = "INVALID_TRANSITION"
    NOT_AUTHORIZED = "NOT_AUTHORIZED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    SETTLEMENT_PENDING = "SETTLEMENT_PENDING"
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    KYC_REQUIRED = "KYC_REQUIRED"
    FEATURE_DISABLED = "FEATURE_DISABLED"
    DEADLINE_NOT_REACHED = "DEADLINE_NOT_REACHED"
    #: A settlement result (ConfirmSettlement, RecordSettlementFailure) names a settlement
    #: that is not the pending one: an older attempt, another kind, one already finished.
    SETTLEMENT_MISMATCH = "SETTLEMENT_MISMATCH"
    #: A commandId the escrow has seen before, now with another type or payload: refused,
    #: never taken for a redelivery (which would replay the first command's outcome).
    COMMAND_ID_REUSED = "COMMAND_ID_REUSED"
    #: A card chargeback on the escrow's payment is open: no release, refund or settlement
    #: starts until the card network closes it (SPEC §10).
    CHARGEBACK_OPEN = "CHARGEBACK_OPEN"


class Refusal(NamedTuple):
    """What a guard returns when a rule is broken: a code and a readable message."""

    code: RejectionCode
    message: str


class RejectedPayment(DomainModel):
    """The money a rejected ConfirmFunds reported: what no escrow accepted (SPEC §10)."""

    provider: Provider
    provider_payment_id: Id
    amount: PositiveMinorUnits
    currency: Currency
    sender_address: Id | None = None


class Rejection(TolerantModel):
    """The record of a rejected command, published on `escrow.rejections.v1`; a rejected
    ConfirmFunds carries the ``payment`` it reported, for the unmatched-funds agent."""

    schema_version: Literal[1] = 1
    command_id: Id
    type: str
    escrow_id: Id
    code: RejectionCode
    message: Text
    rejected_at: Timestamp
    correlation_id: Id | None = None
    trace_id: Id | None = None
    payment: RejectedPayment | None = None
