"""Named business rules: each guard returns a Refusal with a stable code, or None when met.

The tables of who may send what from which status, and every guard ``decide`` and the rules
call, are kept in this one file (a little over 400 lines) so that the precedence documented
in ``decide`` can be checked against the guards side by side.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from .commands import (
    CancelEscrow,
    CloseChargeback,
    Command,
    ConfirmFunds,
    ConfirmSettlement,
    CreateEscrow,
    OpenChargeback,
    RecordSettlementFailure,
    RefundEscrow,
    ReleaseFunds,
    ResolveDispute,
    ResumeSettlement,
)
from .escrow import (
    Actor,
    ActorRole,
    Escrow,
    EscrowStatus,
    Milestone,
    MilestoneStatus,
    SettlementKind,
)
from .money import RAIL_PROVIDER, STRIPE_CHARGE_MAX_MINOR, Currency, Provider, Rail
from .payloads import TIMEOUT_REASON, CancelReason
from .payouts import SettlementStatus
from .rejections import Refusal, RejectionCode
from .settings import DecisionContext, DomainSettings

BUYER, SELLER, OTHER_USER = "buyer", "seller", "other user"
ADMIN, SERVICE, SYSTEM = "admin", "service", "system"

_S = EscrowStatus

#: Who may send each command to an existing escrow (SPEC §2 and §6).
ALLOWED_SENDERS: dict[str, frozenset[str]] = {
    "RecordPaymentInstructions": frozenset({SYSTEM}),
    "ConfirmFunds": frozenset({SYSTEM}),
    "RecordPaymentFailure": frozenset({SYSTEM}),
    "CancelEscrow": frozenset({BUYER, SELLER, ADMIN, SYSTEM}),
    "MarkDelivered": frozenset({SELLER}),
    "ReleaseFunds": frozenset({BUYER, ADMIN, SYSTEM}),
    "RaiseDispute": frozenset({BUYER, SELLER}),
    "ResolveDispute": frozenset({ADMIN}),
    "RefundEscrow": frozenset({ADMIN, SELLER, SYSTEM}),
    "ConfirmSettlement": frozenset({SYSTEM}),
    "RecordSettlementFailure": frozenset({SYSTEM}),
    "DeliverMilestone": frozenset({SELLER}),
    "ReleaseMilestone": frozenset({BUYER, ADMIN}),
    "ResumeSettlement": frozenset({SYSTEM}),
    "OpenChargeback": frozenset({SYSTEM}),
    "CloseChargeback": frozenset({SYSTEM}),
}

#: Which CancelEscrow reason each sender may give.
CANCEL_REASONS_BY_SENDER: dict[str, frozenset[CancelReason]] = {
    BUYER: frozenset({CancelReason.BUYER_CANCELLED}),
    SELLER: frozenset({CancelReason.SELLER_CANCELLED}),
    ADMIN: frozenset({CancelReason.ADMIN}),
    SYSTEM: frozenset({CancelReason.TIMEOUT, CancelReason.COMPLIANCE_REJECTED}),
}

#: From which statuses each command may act (settlement commands: see check_settlement_state).
ALLOWED_FROM: dict[str, frozenset[EscrowStatus]] = {
    "RecordPaymentInstructions": frozenset({_S.AWAIT_FUNDS}),
    "ConfirmFunds": frozenset({_S.AWAIT_FUNDS}),
    "RecordPaymentFailure": frozenset({_S.AWAIT_FUNDS}),
    "CancelEscrow": frozenset({_S.AWAIT_FUNDS}),
    "MarkDelivered": frozenset({_S.FUNDS_HELD}),
    "ReleaseFunds": frozenset({_S.DELIVERED}),
    "RaiseDispute": frozenset({_S.FUNDS_HELD, _S.DELIVERED}),
    "ResolveDispute": frozenset({_S.DISPUTED}),
    "RefundEscrow": frozenset({_S.FUNDS_HELD, _S.DELIVERED}),
    "DeliverMilestone": frozenset({_S.FUNDS_HELD, _S.DELIVERED}),
    "ReleaseMilestone": frozenset({_S.FUNDS_HELD, _S.DELIVERED}),
    # a chargeback needs a payment: on held funds, or ledger only once they have left
    "OpenChargeback": frozenset(
        {_S.FUNDS_HELD, _S.DELIVERED, _S.DISPUTED, _S.RELEASED, _S.REFUNDED}
    ),
    "CloseChargeback": frozenset(
        {_S.FUNDS_HELD, _S.DELIVERED, _S.DISPUTED, _S.RELEASED, _S.REFUNDED}
    ),
}
#: A system timeout refund or release only acts on a DELIVERED escrow.
TIMEOUT_ALLOWED_FROM = frozenset({_S.DELIVERED})

SETTLEMENT_COMMANDS = frozenset(
    {"ConfirmSettlement", "RecordSettlementFailure", "ResumeSettlement"}
)
#: The card network's word: taken whatever the escrow is doing, a pending settlement too.
CHARGEBACK_COMMANDS = frozenset({"OpenChargeback", "CloseChargeback"})
#: What may not start while a chargeback is open (SPEC §10): every release, refund or
#: settlement, timer-driven ones too.  Settlement results still land: that money did move.
REFUSED_WHILE_CHARGEBACK_OPEN = frozenset(
    {"ReleaseFunds", "ResolveDispute", "RefundEscrow", "ReleaseMilestone", "ResumeSettlement"}
)


#: The relation of an actor that is not a user: its role's name (a dict lookup: cheaper than
#: an enum's ``.value``).
_RELATION_OF_ROLE: dict[ActorRole, str] = {r: r.value for r in ActorRole if r != ActorRole.USER}
#: Commands whose payload carries a TIMEOUT reason; the two settlement results.
_TIMEOUT_REASON_COMMANDS = (RefundEscrow, ReleaseFunds)
_SETTLEMENT_RESULTS = (ConfirmSettlement, RecordSettlementFailure)


def actor_relation(escrow: Escrow, actor: Actor) -> str:
    """What the actor is to this escrow: buyer, seller, other user, admin, service, system."""
    if actor.role == ActorRole.USER:
        if actor.id == escrow.buyer_id:
            return BUYER
        if actor.id == escrow.seller_id:
            return SELLER
        return OTHER_USER
    return _RELATION_OF_ROLE[actor.role]


def is_system_timeout(command: Command) -> bool:
    """True for the system's timeout commands (reason TIMEOUT from a system actor)."""
    if command.actor.role != ActorRole.SYSTEM:
        return False
    if isinstance(command, CancelEscrow):
        return command.payload.reason == CancelReason.TIMEOUT
    if isinstance(command, _TIMEOUT_REASON_COMMANDS):
        return command.payload.reason == TIMEOUT_REASON
    return False


def check_creator_authorized(command: CreateEscrow) -> Refusal | None:
    """CreateEscrow comes from the buyer themself (a user) or from a service."""
    actor = command.actor
    if actor.role == ActorRole.SERVICE:
        return None
    if actor.role == ActorRole.USER and actor.id == command.payload.buyer_id:
        return None
    return Refusal(
        RejectionCode.NOT_AUTHORIZED, "CreateEscrow must come from the buyer or a service"
    )


def check_sender_authorized(escrow: Escrow, command: Command) -> Refusal | None:
    """The actor may send this command to this escrow (with this reason)."""
    relation = actor_relation(escrow, command.actor)
    if relation not in ALLOWED_SENDERS[command.type]:
        return Refusal(RejectionCode.NOT_AUTHORIZED, f"{relation} may not send {command.type}")
    if isinstance(command, CancelEscrow):
        if command.payload.reason not in CANCEL_REASONS_BY_SENDER[relation]:
            return Refusal(
                RejectionCode.NOT_AUTHORIZED,
                f"{relation} may not cancel with reason {command.payload.reason.value}",
            )
    elif isinstance(command, _TIMEOUT_REASON_COMMANDS):
        timeout = command.payload.reason == TIMEOUT_REASON
        if timeout != (relation == SYSTEM):
            return Refusal(
                RejectionCode.NOT_AUTHORIZED,
                f"{command.type} with reason TIMEOUT is for the system alone, and the system "
                f"sends it only as a timeout",
            )
    return None


def is_repeated_funds_confirmation(escrow: Escrow, command: Command) -> bool:
    """ConfirmFunds for the provider payment that already funded the escrow (a no-op)."""
    return (
        isinstance(command, ConfirmFunds)
        and escrow.payment is not None
        and escrow.payment.funded_provider_payment_id == command.payload.provider_payment_id
    )


def is_repeated_chargeback(escrow: Escrow, command: Command) -> bool:
    """OpenChargeback for the dispute already recorded, or CloseChargeback repeating the
    outcome already recorded (a no-op, like a repeated ConfirmFunds)."""
    chargeback = escrow.chargeback
    if chargeback is None:
        return False
    if isinstance(command, OpenChargeback):
        return command.payload.dispute_id == chargeback.dispute_id
    if isinstance(command, CloseChargeback):
        return (
            command.payload.dispute_id == chargeback.dispute_id
            and command.payload.outcome.value == chargeback.status.value
        )
    return False


def check_no_open_chargeback(escrow: Escrow, command: Command) -> Refusal | None:
    """No release, refund or settlement starts while a chargeback is open (SPEC §10)."""
    if escrow.chargeback_open and command.type in REFUSED_WHILE_CHARGEBACK_OPEN:
        assert escrow.chargeback is not None
        return Refusal(
            RejectionCode.CHARGEBACK_OPEN,
            f"chargeback {escrow.chargeback.dispute_id} is open; {command.type} must wait "
            f"until the card network closes it",
        )
    return None


def check_settlement_state(escrow: Escrow, command: Command) -> Refusal | None:
    """Only settlement results act while a settlement is pending; they need one pending."""
    pending = escrow.settlement is not None
    if command.type in SETTLEMENT_COMMANDS:
        if not pending:
            if isinstance(command, _SETTLEMENT_RESULTS):
                return Refusal(
                    RejectionCode.SETTLEMENT_MISMATCH,
                    f"settlement {command.payload.settlement_id} is not pending: none is",
                )
            return Refusal(RejectionCode.INVALID_TRANSITION, "no settlement is pending")
        return None
    if command.type in CHARGEBACK_COMMANDS:
        return None
    if pending and not replaces_waiting_release(escrow, command):
        return Refusal(
            RejectionCode.SETTLEMENT_PENDING,
            f"a settlement is pending; {command.type} must wait for its result",
        )
    return None


def replaces_waiting_release(escrow: Escrow, command: Command) -> bool:
    """An admin may refund an escrow whose release waits for a payout account that never
    comes (RefundEscrow, or ResolveDispute REFUND): nothing was sent to a provider, so the
    waiting release is simply replaced.  No timer and no party can do this."""
    settlement = escrow.settlement
    if settlement is None or settlement.status != SettlementStatus.AWAITING_PAYOUT_ACCOUNT:
        return False
    if command.actor.role != ActorRole.ADMIN:
        return False
    if isinstance(command, ResolveDispute):
        return command.payload.resolution == SettlementKind.REFUND
    return isinstance(command, RefundEscrow)


def check_settlement_matches(escrow: Escrow, command: Command) -> Refusal | None:
    """A settlement result names the pending settlement (SPEC §10): a late result of an older
    attempt, of another kind or milestone, never settles the pending one."""
    settlement = escrow.settlement
    if settlement is None or not isinstance(command, _SETTLEMENT_RESULTS):
        return None
    if command.payload.settlement_id != settlement.settlement_id:
        return Refusal(
            RejectionCode.SETTLEMENT_MISMATCH,
            f"settlement {command.payload.settlement_id} is not the pending one "
            f"({settlement.settlement_id})",
        )
    return None


def check_settlement_status(escrow: Escrow, command: Command) -> Refusal | None:
    """A settlement awaiting the seller's payout account can only be resumed; results
    (ConfirmSettlement, RecordSettlementFailure) belong to a settlement that was performed."""
    settlement = escrow.settlement
    if settlement is None or command.type not in SETTLEMENT_COMMANDS:
        return None
    awaiting = settlement.status == SettlementStatus.AWAITING_PAYOUT_ACCOUNT
    if isinstance(command, ResumeSettlement):
        if not awaiting:
            return Refusal(
                RejectionCode.INVALID_TRANSITION, "the settlement is not awaiting a payout account"
            )
        if command.payload.settlement_id != settlement.settlement_id:
            return Refusal(
                RejectionCode.VALIDATION_FAILED,
                f"settlement {command.payload.settlement_id} is not the awaiting one "
                f"({settlement.settlement_id})",
            )
        return None
    if awaiting:
        return Refusal(
            RejectionCode.INVALID_TRANSITION,
            "the settlement awaits the seller's payout account; nothing was sent to a provider",
        )
    return None


def check_status_allows(escrow: Escrow, command: Command) -> Refusal | None:
    """The command may act on an escrow in its current status."""
    if command.type in SETTLEMENT_COMMANDS:
        return None
    allowed = (
        TIMEOUT_ALLOWED_FROM
        if (isinstance(command, _TIMEOUT_REASON_COMMANDS) and is_system_timeout(command))
        else ALLOWED_FROM[command.type]
    )
    if escrow.status not in allowed:
        return Refusal(
            RejectionCode.INVALID_TRANSITION,
            f"{command.type} is not allowed in status {escrow.status.value}",
        )
    return None


def check_milestones_enabled(settings: DomainSettings, has_milestones: bool) -> Refusal | None:
    """Milestone escrows can be created only with FEATURE_MILESTONE_ESCROWS on."""
    if has_milestones and not settings.feature_milestone_escrows:
        return Refusal(RejectionCode.FEATURE_DISABLED, "milestone escrows are disabled")
    return None


def check_delivered_timeout_enabled(settings: DomainSettings, action: str) -> Refusal | None:
    """The DELIVERED timeout needs FEATURE_AUTO_REFUND and acts as configured."""
    if not settings.feature_auto_refund:
        return Refusal(RejectionCode.FEATURE_DISABLED, "the delivered timeout is disabled")
    if settings.delivered_timeout_action != action:
        return Refusal(
            RejectionCode.FEATURE_DISABLED,
            f"the delivered timeout action is {settings.delivered_timeout_action}, not {action}",
        )
    return None


def check_deadline_reached(deadline: datetime | None, now: datetime, what: str) -> Refusal | None:
    """A timeout acts only at or after its deadline."""
    if deadline is None or now < deadline:
        return Refusal(
            RejectionCode.DEADLINE_NOT_REACHED, f"{what} not reached (deadline {deadline})"
        )
    return None


def check_kyc_verified(
    settings: DomainSettings, context: DecisionContext | None, user_ids: Iterable[str]
) -> Refusal | None:
    """With KYC gating on, every party must be verified (no context = nobody verified)."""
    if not settings.feature_kyc_gating:
        return None
    verified = context.kyc_verified_user_ids if context is not None else frozenset()
    missing = [u for u in user_ids if u not in verified]
    if missing:
        return Refusal(RejectionCode.KYC_REQUIRED, f"KYC verification required for {missing}")
    return None


def check_amount_within_max(
    settings: DomainSettings, rail: Rail, currency: Currency, amount: int
) -> Refusal | None:
    """The amount is at most the configured maximum for its currency and, on the Stripe
    rail, Stripe's largest single charge (a PaymentIntent above it would be refused)."""
    limit = max_amount_for_rail(settings, rail, currency)
    if amount > limit:
        return Refusal(
            RejectionCode.VALIDATION_FAILED,
            f"amount {amount} exceeds the maximum {limit} {currency.value} minor units"
            f" for rail {rail.value}",
        )
    return None


def max_amount_for_rail(settings: DomainSettings, rail: Rail, currency: Currency) -> int:
    """The largest amount an escrow on ``rail`` in ``currency`` may hold."""
    limit = settings.max_amount_for(currency)
    if rail == Rail.STRIPE:
        return min(limit, STRIPE_CHARGE_MAX_MINOR)
    return limit


def check_provider_matches_rail(escrow: Escrow, provider: Provider) -> Refusal | None:
    """Money on a rail is moved by that rail's provider."""
    expected = RAIL_PROVIDER[escrow.rail]
    if provider != expected:
        return Refusal(
            RejectionCode.VALIDATION_FAILED,
            f"rail {escrow.rail.value} is served by {expected.value}, not {provider.value}",
        )
    return None


def check_flagged_deposit_funds(escrow: Escrow, command: CancelEscrow) -> Refusal | None:
    """A COMPLIANCE_REJECTED cancellation that names its flagged deposit cancels the escrow
    only when that deposit would have funded it (exactly its amount and currency); any other
    deposit is frozen alone, so a flagged "dust" deposit cannot cancel someone's escrow."""
    p = command.payload
    if p.reason != CancelReason.COMPLIANCE_REJECTED or p.amount is None:
        return None
    if p.amount != escrow.amount or p.currency not in (None, escrow.currency):
        return Refusal(
            RejectionCode.AMOUNT_MISMATCH,
            f"flagged deposit {p.provider_payment_id} of {p.amount} would not fund the escrow "
            f"({escrow.amount} {escrow.currency.value}): it is frozen alone",
        )
    return None


def check_funds_match(escrow: Escrow, command: ConfirmFunds) -> Refusal | None:
    """Confirmed funds are exactly the escrow's amount and currency."""
    p = command.payload
    if p.currency != escrow.currency or p.amount != escrow.amount:
        return Refusal(
            RejectionCode.AMOUNT_MISMATCH,
            f"confirmed {p.amount} {p.currency.value}, "
            f"expected {escrow.amount} {escrow.currency.value}",
        )
    return None


def check_settlement_amount(escrow: Escrow, command: ConfirmSettlement) -> Refusal | None:
    """A confirmed settlement moved exactly the pending settlement's payout amount."""
    settlement = escrow.settlement
    expected = settlement.payout_amount if settlement is not None else None
    if command.payload.amount != expected:
        return Refusal(
            RejectionCode.AMOUNT_MISMATCH,
            f"settlement confirmed {command.payload.amount}, expected {expected}",
        )
    return None


def find_milestone_or_refusal(escrow: Escrow, milestone_id: str) -> Milestone | Refusal:
    """The milestone, or VALIDATION_FAILED when the escrow has no such milestone."""
    milestone = escrow.find_milestone(milestone_id)
    if milestone is None:
        return Refusal(RejectionCode.VALIDATION_FAILED, f"escrow has no milestone {milestone_id}")
    return milestone


def check_milestone_status(milestone: Milestone, expected: MilestoneStatus) -> Refusal | None:
    """The milestone is in the status the command acts on."""
    if milestone.status != expected:
        return Refusal(
            RejectionCode.INVALID_TRANSITION,
            f"milestone {milestone.milestone_id} is {milestone.status.value}, not {expected.value}",
        )
    return None
