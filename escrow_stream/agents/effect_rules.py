"""The payments-effects agent's pure decisions, named by the step of
:mod:`escrow_stream.agents.payment_effects` they serve: which effect an event asks for (1),
whether it is still current (2), whether its settlement is held by a chargeback (3a, 3b), a
release that moves nothing (5), the outcome of an answer or a refusal (6) and the id of the
command that reports it (7).  No I/O: each is a function of the event, snapshot or effect."""

from __future__ import annotations

from typing import Any

from escrow_stream.db import effects
from escrow_stream.db.effects import Effect, EffectKind, EffectResult, EffectState
from escrow_stream.domain import (
    SHORT_TEXT_LENGTH_MAX,
    Escrow,
    EscrowStatus,
    Event,
    Rail,
    SettlementStatus,
    fitted,
)
from escrow_stream.domain.event_data import (
    EscrowCancelledData,
    EscrowCreatedData,
    EscrowRefundedData,
)
from escrow_stream.domain.payloads import CHARGEBACK_REASON
from escrow_stream.domain.reconcile_records import NO_TRANSFER
from escrow_stream.payments.common import failed_command_id, settled_command_id

#: The newest snapshot the PostgreSQL mirror holds of an escrow: (version, escrow).
Mirrored = tuple[int, Escrow] | None


def wanted_effect(event: Event) -> tuple[str, EffectKind] | None:
    """Step 1: the effect key and kind ``event`` asks for, or None."""
    escrow = event.escrow
    if isinstance(event.data, EscrowCreatedData) and escrow.payment is None:
        return effects.instructions_key(escrow.escrow_id), EffectKind.INSTRUCTIONS
    if (
        isinstance(event.data, EscrowCancelledData)
        and escrow.rail is Rail.STRIPE
        and escrow.funded_amount == 0
    ):
        return effects.cancel_instructions_key(escrow.escrow_id), EffectKind.CANCEL_INSTRUCTIONS
    settlement = escrow.settlement
    if settlement is not None and settlement.status is SettlementStatus.PENDING:
        return settlement.settlement_id, EffectKind.SETTLEMENT
    return None


def newest(event: Event, mirrored: Mirrored) -> Escrow:
    """The newest known snapshot: the event's, or the mirror's when it holds a later one."""
    if mirrored is not None and mirrored[0] > event.version:
        return mirrored[1]
    return event.escrow


def is_current(event: Event, key: str, kind: EffectKind, mirrored: Mirrored) -> bool:
    """Step 2: unless the mirror holds a newer version of the escrow, the event's snapshot is
    the newest known and asks for the effect; on a newer one, the effect must still be due
    (the same settlement pending, or still no payment instructions)."""
    snapshot = newest(event, mirrored)
    if snapshot is event.escrow or kind is EffectKind.CANCEL_INSTRUCTIONS:
        return True  # (a cancelled escrow stays cancelled)
    if kind is EffectKind.INSTRUCTIONS:
        return snapshot.status is EscrowStatus.AWAIT_FUNDS and snapshot.payment is None
    settlement = snapshot.settlement
    return (
        settlement is not None
        and settlement.settlement_id == key
        and settlement.status is SettlementStatus.PENDING
    )


def chargeback_open(event: Event, mirrored: Mirrored) -> bool:
    """Step 3a: whether the newest known snapshot shows an open chargeback: its settlement
    is held, not sent."""
    return newest(event, mirrored).chargeback_open


def is_chargeback_refund(event: Event) -> bool:
    """An EscrowRefunded by a lost chargeback (the card network refunded the buyer)."""
    return isinstance(event.data, EscrowRefundedData) and event.data.reason == CHARGEBACK_REASON


def effect_snapshot(effect: Effect) -> Escrow:
    """The escrow as the event that asked for ``effect`` left it (stored without the fields
    no rail reads: ``recentCommands``, ``ledger``)."""
    return Escrow.model_validate(effect.event["escrow"])


def nothing_to_move(effect: Effect, escrow: Escrow) -> dict[str, Any] | None:
    """A release whose fee is the whole amount moves no money (providers refuse a transfer of
    0): its ConfirmSettlement payload, with no provider call; else None."""
    if escrow.settlement is None or escrow.settlement.payout_amount != 0:
        return None
    return {"provider": effect.provider, "providerReference": NO_TRANSFER, "amount": "0"}


def succeeded(effect: Effect, answer: dict[str, Any] | None) -> EffectResult:
    """The outcome of an answered call, and its result command (step 6)."""
    if effect.kind is EffectKind.INSTRUCTIONS:
        assert answer is not None
        payload = {k: v for k, v in answer.items() if k != "clientSecret"}
        return EffectResult(
            state=EffectState.SUCCEEDED,
            provider_object_id=str(payload.get("providerPaymentId")),
            result_type="RecordPaymentInstructions",
            result_payload=payload,
            client_secret=answer.get("clientSecret"),
        )
    if effect.kind is EffectKind.CANCEL_INSTRUCTIONS:  # nothing for the escrow to apply
        reference = (answer or {}).get("providerReference")
        return EffectResult(state=EffectState.SUCCEEDED, provider_object_id=reference)
    if answer is None:  # the custodian confirms by webhook
        return EffectResult(state=EffectState.SUCCEEDED)
    return EffectResult(
        state=EffectState.SUCCEEDED,
        provider_object_id=str(answer.get("providerReference")),
        result_type="ConfirmSettlement",
        result_payload={**answer, "settlementId": effect.key},
    )


def refused(effect: Effect, code: str, message: str) -> EffectResult:
    """The outcome of a permanent refusal, and the command that records it (step 6)."""
    code, message = fitted(code, SHORT_TEXT_LENGTH_MAX) or "refused", fitted(message)
    if effect.kind is EffectKind.CANCEL_INSTRUCTIONS:  # paid meanwhile: unmatched funds
        return EffectResult(state=EffectState.FAILED, error_code=code, error_message=message)
    if effect.kind is EffectKind.INSTRUCTIONS:
        payload: dict[str, Any] = {
            "provider": effect.provider,
            "errorCode": code,
            "errorMessage": message,
        }
        result_type = "RecordPaymentFailure"
    else:
        payload = {
            "settlementId": effect.key,
            "errorCode": code,
            "errorMessage": message,
            "retryable": False,
        }
        result_type = "RecordSettlementFailure"
    return EffectResult(
        state=EffectState.FAILED,
        result_type=result_type,
        result_payload=payload,
        error_code=code,
        error_message=message,
    )


def result_command_id(effect: Effect, state: EffectState) -> str:
    """Step 7: the id of the command reporting ``effect``'s outcome."""
    if effect.kind is EffectKind.INSTRUCTIONS:
        suffix = "instructions" if state is EffectState.SUCCEEDED else "instructions-failed"
        return f"payments:{suffix}:{effect.escrow_id}"
    if state is EffectState.SUCCEEDED:
        return settled_command_id(effect.key)
    return failed_command_id(effect.key)
