"""The escrow aggregate: statuses, the seed transition table and the state snapshot models."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

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
    """What the payment provider told us about the buyer's payment."""

    provider: Provider
    provider_payment_id: Id | None = None
    client_secret: Text | None = None
    deposit_address: Id | None = None
    funded_provider_payment_id: Id | None = None
    sender_address: Id | None = None
    funded_at: Timestamp | None = None
    failure_count: int = 0
    last_error_code: ShortText | None = None
    last_error_message: Text | None = None


class Settlement(DomainModel):
    """A pending two-phase settlement: requested, waiting for the provider's result."""

    kind: SettlementKind
    requested_at: Timestamp
    attempt: int = Field(ge=1)
    reason: ShortText
    previous_status: EscrowStatus
    milestone_id: Id | None = None
    amount: PositiveMinorUnits
    payout_amount: MinorUnits
    fee_amount: MinorUnits


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


class PostingKind(StrEnum):
    """What a ledger posting records."""

    FUNDS_HELD = "FUNDS_HELD"
    RELEASE = "RELEASE"
    REFUND = "REFUND"


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
    """The outcome of one accepted command: the events it produced, in order."""

    command_id: Id
    events: tuple[EventRecord, ...]


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
    dispute: Dispute | None = None
    milestones: tuple[Milestone, ...] = Field(default=(), max_length=MILESTONES_MAX)
    funded_amount: MinorUnits = 0
    released_amount: MinorUnits = 0
    refunded_amount: MinorUnits = 0
    fee_amount: MinorUnits = 0
    cancellation_reason: ShortText | None = None
    ledger: tuple[Posting, ...] = ()
    recent_commands: tuple[CommandRecord, ...] = ()
    recent_commands_max: int = Field(default=1000, ge=1)

    @property
    def holding_amount(self) -> int:
        """Money still held in escrow (funded minus released minus refunded)."""
        return self.funded_amount - self.released_amount - self.refunded_amount

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
