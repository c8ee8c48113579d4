"""Pure domain core of escrow-stream: commands, events, decide/evolve, money and ledger.

Imports only the standard library and pydantic: no Faust, no I/O, no clock, no randomness
(time comes in as ``now``, ids are derived from escrowId and version).

Design notes

* **Duplicates.** Each escrow remembers the outcome of its most recent accepted commands in
  ``Escrow.recent_commands``: an ordered tuple of ``{commandId, events}`` where each event is
  kept without its snapshot (eventId, type, version, occurredAt, ids, actor, data). The
  record is written by ``evolve``, so it lives in the table and folding the event list from
  ``None`` rebuilds it exactly. It is bounded by ``recentCommandsMax`` (taken from
  ``DomainSettings.recent_commands_max`` when the escrow is created and stored in it, so
  folding is independent of later settings); when full, the oldest command is evicted
  first (FIFO). A duplicate commandId re-emits the recorded events with the same eventIds,
  versions and data and ``Decision.duplicate = True``; the replayed events carry the
  escrow's *current* snapshot (for the newest command, the common crash-redelivery case,
  that is byte-for-byte the original event; for older commands it keeps the compacted
  events topic from moving backwards).
  Rejections and no-ops produce no event, so the escrow does not record them: the
  processor keeps them in the ``command-outcomes`` table (``tables/outcomes.py``), and a
  redelivered rejected command gets its recorded rejection back, never a new decision
  against a state that may have moved on. An evicted commandId is decided afresh.
* **Check precedence** is documented in ``escrow_stream.domain.decide``.
* **Timeouts** are system commands with reason TIMEOUT: CancelEscrow in AWAIT_FUNDS past
  expiresAt; in DELIVERED past autoRefundAt, RefundEscrow (``delivered_timeout_action=
  "refund"``, the default) or ReleaseFunds{reason: TIMEOUT} (``"release"``); the other
  action is FEATURE_DISABLED, as is either one with ``feature_auto_refund`` off. Before the
  deadline: DEADLINE_NOT_REACHED. ``timeout_command_for`` builds the due command.
* **Settlement** is two-phase: SettlementRequested puts ``settlement`` on the escrow
  (settlementId, kind, attempt, reason, amount, payoutAmount, feeAmount, milestoneId?); a
  result (ConfirmSettlement, RecordSettlementFailure) must name that settlementId
  (``escrow.settlement_id_for``), else SETTLEMENT_MISMATCH; ConfirmSettlement's
  ``amount`` must equal ``payoutAmount`` (what the provider moved: amount - fee for a
  release, the amount for a refund).
* **Milestones** are settled one by one: ReleaseMilestone requests a RELEASE settlement for
  that milestone; ConfirmSettlement emits MilestoneReleased. Delivering the last pending
  milestone makes a FUNDS_HELD escrow DELIVERED; releasing the last one makes it RELEASED.
  ReleaseFunds / ResolveDispute / RefundEscrow on a milestone escrow settle the whole
  remainder (EscrowReleased / EscrowRefunded mark the open milestones). The fee is spread
  proportionally (``money.release_fee``), totalling sellerFee when everything is released.
* **Ledger** accounts: ``external:{provider}`` (funding), ``escrow:{escrowId}:holding``,
  ``seller:{sellerId}``, ``platform:fees``, ``buyer:{buyerId}`` (refunds, also by the card
  network on a lost chargeback: posting CHARGEBACK_REFUND), and for chargebacks the held
  funds do not cover ``platform:chargebacks`` against ``seller:{sellerId}:receivable`` (or
  ``buyer:{buyerId}:receivable`` after a refund): posting CHARGEBACK, reversed by
  CHARGEBACK_REVERSED when won. Line amounts are signed; positive means money arrives at the
  account; each posting sums to zero.
* **Chargebacks** (``chargeback`` on the snapshot: disputeId, status OPEN/WON/LOST, amount,
  reason, openedAt, closedAt, receivable) are decided as documented in ``decide``.
"""

from ._model import SHORT_TEXT_LENGTH_MAX, TEXT_LENGTH_MAX, fitted
from .commands import (
    COMMAND_TYPES,
    CancelEscrow,
    CloseChargeback,
    Command,
    CommandInvalid,
    ConfirmFunds,
    ConfirmSettlement,
    CreateEscrow,
    DeliverMilestone,
    MarkDelivered,
    OpenChargeback,
    RaiseDispute,
    RecordPaymentFailure,
    RecordPaymentInstructions,
    RecordSettlementFailure,
    RefundEscrow,
    ReleaseFunds,
    ReleaseMilestone,
    ResolveDispute,
    ResumeSettlement,
    command_fingerprint,
    is_release_path,
    parse_command,
)
from .decide import Decision, decide
from .escrow import (
    TERMINAL_STATUSES,
    TRANSITIONS,
    Actor,
    ActorRole,
    Escrow,
    EscrowStatus,
    MilestoneStatus,
    SettlementKind,
    is_allowed_transition,
)
from .events import (
    EVENT_TYPES,
    Event,
    EventInvalid,
    event_id_for,
    parse_event,
)
from .evolve import EvolveError, evolve
from .ledger import check_invariants, ledger_balances
from .money import Currency, Provider, Rail
from .payloads import CancelReason
from .payouts import (
    BuyerDestination,
    PayoutDestination,
    SettlementStatus,
    StripeAccountDestination,
    WalletDestination,
)
from .rejections import Rejection, RejectionCode
from .schemas import json_schemas
from .settings import DecisionContext, DomainSettings
from .timeouts import timeout_command_for

__all__ = [
    "COMMAND_TYPES",
    "EVENT_TYPES",
    "SHORT_TEXT_LENGTH_MAX",
    "TERMINAL_STATUSES",
    "TEXT_LENGTH_MAX",
    "TRANSITIONS",
    "Actor",
    "ActorRole",
    "BuyerDestination",
    "CancelEscrow",
    "CancelReason",
    "CloseChargeback",
    "Command",
    "CommandInvalid",
    "ConfirmFunds",
    "ConfirmSettlement",
    "CreateEscrow",
    "Currency",
    "Decision",
    "DecisionContext",
    "DeliverMilestone",
    "DomainSettings",
    "Escrow",
    "EscrowStatus",
    "Event",
    "EventInvalid",
    "EvolveError",
    "MarkDelivered",
    "MilestoneStatus",
    "OpenChargeback",
    "PayoutDestination",
    "Provider",
    "Rail",
    "RaiseDispute",
    "RecordPaymentFailure",
    "RecordPaymentInstructions",
    "RecordSettlementFailure",
    "RefundEscrow",
    "Rejection",
    "RejectionCode",
    "ReleaseFunds",
    "ReleaseMilestone",
    "ResolveDispute",
    "ResumeSettlement",
    "SettlementKind",
    "SettlementStatus",
    "StripeAccountDestination",
    "WalletDestination",
    "check_invariants",
    "command_fingerprint",
    "decide",
    "event_id_for",
    "evolve",
    "fitted",
    "is_allowed_transition",
    "is_release_path",
    "json_schemas",
    "ledger_balances",
    "parse_command",
    "parse_event",
    "timeout_command_for",
]
