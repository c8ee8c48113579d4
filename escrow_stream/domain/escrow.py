"""The escrow aggregate: statuses, the seed transition table and the state snapshot models."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from ._model import (
    MILESTONES_MAX,
    DomainModel,
    EvidenceKeys,
    Id,
    ShortText,
    Text,
    Timestamp,
)
from .money import Currency, MinorUnits, PositiveMinorUnits, Provider, Rail, SignedMinorUnits
from .payouts import PayoutDestination, SettlementStatus


class EscrowStatus(StrEnum):
    """Lifecycle status of an escrow (seed)."""

    AWAIT_FUNDS = "AWAIT_FUNDS"
    FUNDS_HELD = "FUNDS_HELD"
    DELIVERED = "DELIVERED"
    DISPUTED = "DISPUTED"
    RELEASED = "RELEASED"
    REFUNDED = "REFUNDED"
    CANCELLED = "CANCELLED"


#: The seed's VALID_TRANSITIONS, exactly.
TRANSITIONS: dict[EscrowStatus, frozenset[EscrowStatus]] = {
    EscrowStatus.AWAIT_FUNDS: frozenset({EscrowStatus.FUNDS_HELD, EscrowStatus.CANCELLED}),
    EscrowStatus.FUNDS_HELD: frozenset(
        {EscrowStatus.DELIVERED, EscrowStatus.DISPUTED, EscrowStatus.REFUNDED}
    ),
    EscrowStatus.DELIVERED: frozenset(
        {EscrowStatus.RELEASED, EscrowStatus.DISPUTED, EscrowStatus.REFUNDED}
    ),
    EscrowStatus.DISPUTED: frozenset({EscrowStatus.RELEASED, EscrowStatus.REFUNDED}),
    EscrowStatus.RELEASED: frozenset(),
    EscrowStatus.REFUNDED: frozenset(),
    EscrowStatus.CANCELLED: frozenset(),
}
TERMINAL_STATUSES = frozenset(s for s, targets in TRANSITIONS.items() if not targets)


def is_allowed_transition(before: EscrowStatus, after: EscrowStatus) -> bool:
    """True when `before -> after` is in the seed table (staying put is always allowed)."""
    return before == after or after in TRANSITIONS[before]


class ActorRole(StrEnum):
    """Who sends a command; a `user` is the buyer or the seller by id."""

    USER = "user"
    ADMIN = "admin"
    SERVICE = "service"
    SYSTEM = "system"


class Actor(DomainModel):
    """The identity a command is sent as."""

    id: Id
    role: ActorRole


class SettlementKind(StrEnum):
    """Direction of a settlement: to the seller or back to the buyer."""

    RELEASE = "RELEASE"
    REFUND = "REFUND"


class MilestoneStatus(StrEnum):
    """Status of one milestone of a milestone escrow."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    RELEASED = "RELEASED"
    REFUNDED = "REFUNDED"


SETTLED_MILESTONE_STATUSES = frozenset({MilestoneStatus.RELEASED, MilestoneStatus.REFUNDED})


class Payment(DomainModel):
    """What the payment provider told us about the buyer's payment (never the Stripe client
    secret: only the buyer gets that, from ``GET /api/escrow/{id}/payment``)."""

    provider: Provider
    provider_payment_id: Id | None = None
    deposit_address: Id | None = None
    funded_provider_payment_id: Id | None = None
    sender_address: Id | None = None
    funded_at: Timestamp | None = None
    failure_count: int = 0
    last_error_code: ShortText | None = None
    last_error_message: Text | None = None


def settlement_id_for(
    escrow_id: str, kind: SettlementKind, milestone_id: str | None, attempt: int
) -> str:
    """The id of one settlement attempt (SPEC §10): ``escrow-{kind}:{escrowId}:{milestoneId
    or "all"}:{attempt}``.  Results must name it; providers get it as the idempotency key."""
    return f"escrow-{kind.value.lower()}:{escrow_id}:{milestone_id or 'all'}:{attempt}"


class Settlement(DomainModel):
    """A pending two-phase settlement: requested, waiting for the provider's result."""

    settlement_id: Id
    kind: SettlementKind
    requested_at: Timestamp
    attempt: int = Field(ge=1)
    reason: ShortText
    previous_status: EscrowStatus
    milestone_id: Id | None = None
    amount: PositiveMinorUnits
    payout_amount: MinorUnits
    fee_amount: MinorUnits
    #: AWAITING_PAYOUT_ACCOUNT: a release whose seller has no ACTIVE account yet.
    status: SettlementStatus = SettlementStatus.PENDING
    #: Where the money goes, recorded when requested (None while awaiting the account).
    destination: PayoutDestination | None = None


class Dispute(DomainModel):
    """A dispute raised by a party, and the admin's resolution once given."""

    raised_by: Actor
    reason: ShortText
    raised_at: Timestamp
    evidence_keys: EvidenceKeys = ()
    previous_status: EscrowStatus
    resolution: SettlementKind | None = None
    resolution_reason: ShortText | None = None
    resolved_at: Timestamp | None = None


class Milestone(DomainModel):
    """One milestone of a milestone escrow."""

    milestone_id: Id
    title: ShortText
    amount: PositiveMinorUnits
    status: MilestoneStatus = MilestoneStatus.PENDING
    delivered_at: Timestamp | None = None
    settled_at: Timestamp | None = None


class ChargebackStatus(StrEnum):
    """Where a card chargeback (a Stripe dispute) stands."""

    OPEN = "OPEN"
    WON = "WON"
    LOST = "LOST"


class Chargeback(DomainModel):
    """A card chargeback on the escrow's payment (SPEC §10).  ``receivableAmount`` is what
    the escrow's held funds could not cover when it opened (everything, on a RELEASED or
    REFUNDED escrow), booked as owed by ``receivableAccount`` until it is won."""

    dispute_id: Id
    status: ChargebackStatus
    amount: PositiveMinorUnits
    reason: ShortText
    opened_at: Timestamp
    closed_at: Timestamp | None = None
    charge_id: Id | None = None
    payment_intent_id: Id | None = None
    receivable_amount: MinorUnits = 0
    receivable_account: str | None = Field(default=None, min_length=1, max_length=300)


class PostingKind(StrEnum):
    """What a ledger posting records."""

    FUNDS_HELD = "FUNDS_HELD"
    RELEASE = "RELEASE"
    REFUND = "REFUND"
    #: the platform's loss on a chargeback its held funds do not cover, owed back to it
    CHARGEBACK = "CHARGEBACK"
    #: a won chargeback: that receivable reversed
    CHARGEBACK_REVERSED = "CHARGEBACK_REVERSED"
    #: a lost chargeback on held funds: the card network gave them back to the buyer
    CHARGEBACK_REFUND = "CHARGEBACK_REFUND"


class LedgerLine(DomainModel):
    """One line of a posting: positive = money arrives at the account."""

    account: str = Field(min_length=1, max_length=300)
    amount: SignedMinorUnits


class Posting(DomainModel):
    """A balanced double-entry posting made by one money event."""

    posting_id: Id
    kind: PostingKind
    currency: Currency
    occurred_at: Timestamp
    lines: tuple[LedgerLine, ...]


class EventRecord(DomainModel):
    """An emitted event without its snapshot, kept to re-emit it for a duplicate command."""

    event_id: Id
    type: str
    version: int
    occurred_at: Timestamp
    causation_id: Id
    correlation_id: Id
    trace_id: Id | None = None
    actor: Actor
    data: dict[str, Any]


class CommandRecord(DomainModel):
    """The outcome of one accepted command: the events it produced, in order, and the
    fingerprint of the command (None in records kept before fingerprints existed)."""

    command_id: Id
    events: tuple[EventRecord, ...]
    fingerprint: Id | None = None


#: The Stripe client secret's keys in snapshots stored before SPEC §10.
_SECRET_KEYS = frozenset({"clientSecret", "client_secret"})


def _without_secret_in_events(record: Any) -> Any:
    if not isinstance(record, dict) or not isinstance(record.get("events"), list | tuple):
        return record
    events = [
        {**e, "data": {k: v for k, v in e["data"].items() if k not in _SECRET_KEYS}}
        if isinstance(e, dict) and isinstance(e.get("data"), dict)
        else e
        for e in record["events"]
    ]
    return {**record, "events": events}


class Escrow(DomainModel):
    """Full state of one escrow; every event carries this snapshot as it is after the event."""

    escrow_id: Id
    offer_id: Id
    contract_id: Id
    buyer_id: Id
    seller_id: Id
    rail: Rail
    currency: Currency
    amount: PositiveMinorUnits
    seller_fee: MinorUnits = 0
    #: Informational only (older escrows, service-set): a release pays the settlement's
    #: recorded ``destination``, the seller's ACTIVE payout account, never this field.
    seller_account_id: Id | None = None
    buyer_wallet_address: Id | None = None
    status: EscrowStatus
    version: int = Field(ge=1)
    created_at: Timestamp
    updated_at: Timestamp
    expires_at: Timestamp
    auto_refund_at: Timestamp | None = None
    payment: Payment | None = None
    settlement: Settlement | None = None
    settlement_attempts: int = 0
    #: When a release of the whole escrow was first requested: no timer refunds it since.
    release_approved_at: Timestamp | None = None
    dispute: Dispute | None = None
    chargeback: Chargeback | None = None
    milestones: tuple[Milestone, ...] = Field(default=(), max_length=MILESTONES_MAX)
    funded_amount: MinorUnits = 0
    released_amount: MinorUnits = 0
    refunded_amount: MinorUnits = 0
    fee_amount: MinorUnits = 0
    cancellation_reason: ShortText | None = None
    ledger: tuple[Posting, ...] = ()
    recent_commands: tuple[CommandRecord, ...] = ()
    recent_commands_max: int = Field(default=1000, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _upgrade_stored(cls, data: Any) -> Any:
        """Snapshots stored before SPEC §10: give a pending settlement its id, and drop the
        Stripe client secret (payment, remembered events), which no snapshot carries now."""
        if not isinstance(data, dict):
            return data
        escrow_id = data.get("escrowId", data.get("escrow_id"))
        settlement = data.get("settlement")
        payment = data.get("payment")
        legacy_settlement = (
            isinstance(settlement, dict)
            and "settlementId" not in settlement
            and "settlement_id" not in settlement
        )
        legacy_payment = isinstance(payment, dict) and bool(_SECRET_KEYS & payment.keys())
        records = data.get("recentCommands", data.get("recent_commands"))
        legacy_records = isinstance(records, list | tuple) and any(
            isinstance(e, dict)
            and isinstance(e.get("data"), dict)
            and _SECRET_KEYS & e["data"].keys()
            for r in records
            if isinstance(r, dict)
            for e in r.get("events", ())
        )
        if not (legacy_settlement or legacy_payment or legacy_records):
            return data
        data = dict(data)
        if legacy_records and isinstance(records, list | tuple):
            data.pop("recent_commands", None)
            data["recentCommands"] = [_without_secret_in_events(r) for r in records]
        if legacy_settlement and isinstance(settlement, dict) and isinstance(escrow_id, str):
            milestone = settlement.get("milestoneId", settlement.get("milestone_id"))
            data["settlement"] = {
                **settlement,
                "settlementId": settlement_id_for(
                    escrow_id, SettlementKind(settlement["kind"]), milestone, settlement["attempt"]
                ),
            }
        if legacy_payment and isinstance(payment, dict):
            data["payment"] = {k: v for k, v in payment.items() if k not in _SECRET_KEYS}
        return data

    @property
    def holding_amount(self) -> int:
        """Money still held in escrow (funded minus released minus refunded)."""
        return self.funded_amount - self.released_amount - self.refunded_amount

    @property
    def chargeback_open(self) -> bool:
        """True while a card chargeback on the escrow's payment is open."""
        return self.chargeback is not None and self.chargeback.status == ChargebackStatus.OPEN

    def find_command(self, command_id: str) -> CommandRecord | None:
        """The recorded outcome of `command_id`, if it is still remembered."""
        for record in reversed(self.recent_commands):
            if record.command_id == command_id:
                return record
        return None

    def find_milestone(self, milestone_id: str) -> Milestone | None:
        """The milestone with this id, if any."""
        for milestone in self.milestones:
            if milestone.milestone_id == milestone_id:
                return milestone
        return None
