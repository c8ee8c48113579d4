"""A seeded random run of the domain core whose every output is kept as golden JSON.

``tests/unit/data/domain_golden.jsonl`` was written by this module from the code as it was
before decide/evolve were made faster (issue 13); ``test_domain_golden`` replays the same
run and requires byte-identical output.  Regenerate it only on purpose (a contract change):

    .venv/bin/python tests/unit/golden_run.py > tests/unit/data/domain_golden.jsonl

Each line is one step: the command as sent (wire JSON), the clock, and what came out: every
event as published (``encode_event``), the rejection as published, the duplicate flag, the
command's fingerprint, and sha256 digests of the full table snapshot (with its remembered
commands) and of the event without unset fields (which pins ``model_fields_set`` too).  The
last line of each escrow holds its full table snapshot.  Every accepted step also checks the
evolve path: its events read back from JSON fold to the same snapshot.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from escrow_stream.domain import (
    CommandInvalid,
    DecisionContext,
    DomainSettings,
    Escrow,
    Event,
    StripeAccountDestination,
    WalletDestination,
    command_fingerprint,
    decide,
    evolve,
    parse_command,
    parse_event,
)
from escrow_stream.messages import encode_event

T0 = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
SEED = 13
ESCROWS = 26
STEPS = 20

BUYER, SELLER = "buyer-7", "seller-7"
ACTORS: dict[str, dict[str, str]] = {
    "buyer": {"id": BUYER, "role": "user"},
    "seller": {"id": SELLER, "role": "user"},
    "other": {"id": "user-9", "role": "user"},
    "admin": {"id": "admin-1", "role": "admin"},
    "service": {"id": "marketplace", "role": "service"},
    "system": {"id": "payments-agent", "role": "system"},
}
ROLES = tuple(ACTORS)

#: The role that normally sends each command.
SENDER: dict[str, str] = {
    "CreateEscrow": "buyer",
    "RecordPaymentInstructions": "system",
    "ConfirmFunds": "system",
    "RecordPaymentFailure": "system",
    "CancelEscrow": "buyer",
    "MarkDelivered": "seller",
    "ReleaseFunds": "buyer",
    "RaiseDispute": "buyer",
    "ResolveDispute": "admin",
    "RefundEscrow": "admin",
    "ConfirmSettlement": "system",
    "RecordSettlementFailure": "system",
    "DeliverMilestone": "seller",
    "ReleaseMilestone": "buyer",
    "ResumeSettlement": "system",
    "OpenChargeback": "system",
    "CloseChargeback": "system",
}
TYPES = tuple(SENDER)

#: What usually comes next from each status (a run that mostly moves forward).
NEXT: dict[str | None, tuple[str, ...]] = {
    None: ("CreateEscrow",),
    "AWAIT_FUNDS": (
        "RecordPaymentInstructions",
        "ConfirmFunds",
        "ConfirmFunds",
        "RecordPaymentFailure",
        "CancelEscrow",
    ),
    "FUNDS_HELD": (
        "MarkDelivered",
        "DeliverMilestone",
        "ReleaseMilestone",
        "RaiseDispute",
        "RefundEscrow",
        "OpenChargeback",
    ),
    "DELIVERED": (
        "ReleaseFunds",
        "ReleaseFunds",
        "ReleaseMilestone",
        "RaiseDispute",
        "RefundEscrow",
        "OpenChargeback",
    ),
    "DISPUTED": ("ResolveDispute", "ResolveDispute", "OpenChargeback"),
    "RELEASED": ("OpenChargeback", "CloseChargeback"),
    "REFUNDED": ("OpenChargeback", "CloseChargeback"),
    "CANCELLED": ("ConfirmFunds",),
}
PENDING_NEXT = ("ConfirmSettlement", "ConfirmSettlement", "RecordSettlementFailure")


def _create(rng: random.Random, rail: str) -> dict[str, Any]:
    amount = rng.choice([1_000, 12_345, 125_000, 99_999_999])
    payload: dict[str, Any] = {
        "offerId": f"offer-{rng.randrange(100)}",
        "contractId": f"contract-{rng.randrange(100)}",
        "buyerId": BUYER,
        "sellerId": SELLER,
        "rail": rail,
        "amount": str(amount),
        "currency": "USD" if rail == "STRIPE" else "USDC",
    }
    if rng.random() < 0.6:
        payload["sellerFee"] = str(rng.choice([0, amount // 50]))
    if rng.random() < 0.3:
        payload["sellerAccountId"] = "acct_legacy"
    if rail == "USDC_BASE" and rng.random() < 0.5:
        payload["buyerWalletAddress"] = "0xbuyerwallet"
    if rng.random() < 0.5:
        first = amount // 3
        payload["milestones"] = [
            {"milestoneId": "m1", "title": "Design\tphase", "amount": str(first)},
            {"milestoneId": "m2", "title": "Build", "amount": str(amount - first)},
        ]
    return payload


def _payload(
    rng: random.Random, kind: str, role: str, state: Escrow | None, rail: str, exact: bool = False
) -> dict[str, Any] | None:
    """A payload for ``kind``; now and then a wrong amount or settlement, unless ``exact``."""
    provider = "stripe" if rail == "STRIPE" else "custodian"
    currency = "USD" if rail == "STRIPE" else "USDC"
    amount = state.amount if state is not None else 1_000
    settlement = state.settlement if state is not None else None
    settlement_id = settlement.settlement_id if settlement else "escrow-release:x:all:1"
    milestone = rng.choice(["m1", "m2", "m2", "m9"])
    if kind == "CreateEscrow":
        return _create(rng, rail)
    if kind == "RecordPaymentInstructions":
        p = {"provider": provider, "providerPaymentId": f"pi_{rng.randrange(3)}"}
        if rail != "STRIPE":
            p["depositAddress"] = "0xdeposit"
        return p
    if kind == "ConfirmFunds":
        p = {
            "provider": provider,
            "providerPaymentId": f"pi_{rng.randrange(3)}",
            "amount": str(amount if exact or rng.random() < 0.85 else amount + 1),
            "currency": currency,
        }
        if rail != "STRIPE":
            p["senderAddress"] = "0xsender"
        return p
    if kind == "RecordPaymentFailure":
        return {
            "provider": provider,
            "providerPaymentId": "pi_0",
            "errorCode": "card_declined",
            "errorMessage": "Your card was declined.\nTry another card.",
        }
    if kind == "CancelEscrow":
        reasons = {
            "buyer": "BUYER_CANCELLED",
            "seller": "SELLER_CANCELLED",
            "admin": "ADMIN",
            "system": rng.choice(["TIMEOUT", "COMPLIANCE_REJECTED"]),
        }
        reason = reasons.get(role, "BUYER_CANCELLED")
        if reason == "COMPLIANCE_REJECTED":
            return {
                "reason": reason,
                "providerPaymentId": "pi_flagged",
                "amount": str(amount),
                "currency": currency,
            }
        return {"reason": reason}
    if kind == "MarkDelivered":
        return rng.choice([{}, {"note": "shipped\ttoday", "evidenceKeys": ["ev/1.png", "ev/2"]}])
    if kind == "ReleaseFunds":
        return {"reason": "TIMEOUT"} if role == "system" else None
    if kind == "RaiseDispute":
        return {"reason": "not as described", "evidenceKeys": ["ev/d.png"]}
    if kind == "ResolveDispute":
        return {"resolution": rng.choice(["RELEASE", "REFUND"]), "reason": "decided"}
    if kind == "RefundEscrow":
        return {"reason": "TIMEOUT" if role == "system" else "cannot deliver"}
    if kind == "ConfirmSettlement":
        moved = settlement.payout_amount if settlement else 1
        return {
            "settlementId": settlement_id
            if exact or rng.random() < 0.9
            else "escrow-refund:x:all:9",
            "provider": provider,
            "providerReference": f"tr_{rng.randrange(5)}",
            "amount": str(moved),
        }
    if kind == "RecordSettlementFailure":
        return {
            "settlementId": settlement_id,
            "errorCode": "insufficient_funds",
            "errorMessage": "platform balance too low",
            "retryable": rng.random() < 0.5,
        }
    if kind in ("DeliverMilestone", "ReleaseMilestone"):
        return {"milestoneId": milestone}
    if kind == "ResumeSettlement":
        return {"settlementId": settlement_id}
    if kind == "OpenChargeback":
        funded = state.funded_amount if state is not None else 0
        return {
            "provider": provider,
            "disputeId": "dp_1",
            "chargeId": "ch_1",
            "paymentIntentId": "pi_1",
            "amount": str(max(1, funded if exact or rng.random() < 0.7 else funded // 2)),
            "currency": currency,
            "reason": "fraudulent",
        }
    assert kind == "CloseChargeback"
    return {"disputeId": "dp_1", "outcome": rng.choice(["WON", "LOST"]), "amount": str(amount)}


def _envelope(
    escrow_id: str, command_id: str, kind: str, role: str, at: datetime, payload: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schemaVersion": 1,
        "commandId": command_id,
        "type": kind,
        "escrowId": escrow_id,
        "actor": ACTORS[role],
        "issuedAt": at.isoformat(),
        "traceId": f"trace-{command_id}",
    }
    if command_id.endswith("3"):
        data["correlationId"] = f"corr-{escrow_id}"
    if payload is not None:
        data["payload"] = payload
    return data


def _settings(rng: random.Random) -> DomainSettings:
    return DomainSettings(
        fee_bps=rng.choice([0, 250]),
        recent_commands_max=rng.choice([3, 1000]),
        delivered_timeout_action=rng.choice(["refund", "release"]),
        feature_auto_refund=rng.random() < 0.8,
        feature_kyc_gating=rng.random() < 0.3,
        feature_milestone_escrows=rng.random() < 0.9,
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MILESTONES: dict[str, Any] = {
    "milestones": [
        {"milestoneId": "m1", "title": "Design", "amount": "30000"},
        {"milestoneId": "m2", "title": "Build", "amount": "60000"},
    ]
}

#: Lives the random walk seldom reaches: (rail, settings, steps); a step is (type, role,
#: payload changes, context: "none" | "payout" | "all", hours to advance first).
SCRIPTS: tuple[
    tuple[str, dict[str, Any], tuple[tuple[str, str, dict[str, Any], str, float], ...]], ...
] = (
    (  # milestones delivered and released one by one, with a retried settlement
        "STRIPE",
        {"fee_bps": 250},
        (
            (
                "CreateEscrow",
                "buyer",
                {"amount": "90000", "sellerFee": "301", **MILESTONES},
                "all",
                0,
            ),
            ("RecordPaymentInstructions", "system", {"providerPaymentId": "pi_0"}, "none", 1),
            ("ConfirmFunds", "system", {"providerPaymentId": "pi_0"}, "none", 1),
            ("DeliverMilestone", "seller", {"milestoneId": "m1"}, "none", 1),
            ("ReleaseMilestone", "buyer", {"milestoneId": "m1"}, "all", 1),
            ("RecordSettlementFailure", "system", {}, "none", 1),
            ("ReleaseMilestone", "buyer", {"milestoneId": "m1"}, "all", 1),
            ("ConfirmSettlement", "system", {}, "none", 1),
            ("DeliverMilestone", "seller", {"milestoneId": "m2"}, "none", 1),
            ("ReleaseMilestone", "buyer", {"milestoneId": "m2"}, "all", 1),
            ("ConfirmSettlement", "system", {}, "none", 1),
            ("OpenChargeback", "system", {}, "none", 1),
            ("CloseChargeback", "system", {"outcome": "LOST"}, "none", 1),
        ),
    ),
    (  # a release awaiting the seller's payout account, resumed, then charged back and won
        "USDC_BASE",
        {"recent_commands_max": 2},
        (
            ("CreateEscrow", "service", {}, "all", 0),
            ("RecordPaymentInstructions", "system", {}, "none", 1),
            ("ConfirmFunds", "system", {}, "none", 1),
            ("MarkDelivered", "seller", {}, "none", 1),
            ("ReleaseFunds", "buyer", None, "none", 1),
            ("ConfirmSettlement", "system", {}, "none", 1),
            ("ResumeSettlement", "system", {}, "payout", 1),
            ("ConfirmSettlement", "system", {}, "none", 1),
        ),
    ),
    (  # charged back while held, lost: the network refunded the buyer
        "STRIPE",
        {},
        (
            ("CreateEscrow", "buyer", {"milestones": []}, "all", 0),
            ("ConfirmFunds", "system", {"providerPaymentId": "pi_0"}, "none", 1),
            ("OpenChargeback", "system", {"amount": "500"}, "none", 1),
            ("ReleaseFunds", "buyer", None, "payout", 1),
            ("CloseChargeback", "system", {"outcome": "LOST"}, "none", 1),
        ),
    ),
    (  # a chargeback opened during a release, lost after the release was confirmed
        "STRIPE",
        {},
        (
            ("CreateEscrow", "buyer", {"milestones": [], "amount": "80000"}, "all", 0),
            ("ConfirmFunds", "system", {"providerPaymentId": "pi_0"}, "none", 1),
            ("MarkDelivered", "seller", {}, "none", 1),
            ("ReleaseFunds", "admin", None, "payout", 1),
            ("OpenChargeback", "system", {"amount": "80000"}, "none", 1),
            ("ConfirmSettlement", "system", {}, "none", 1),
            ("CloseChargeback", "system", {"outcome": "LOST"}, "none", 1),
        ),
    ),
    (  # the timers: auto-refund after delivery, then the payment deadline on another
        "USDC_BASE",
        {"delivered_timeout_action": "refund"},
        (
            ("CreateEscrow", "buyer", {"milestones": []}, "all", 0),
            ("ConfirmFunds", "system", {}, "none", 1),
            ("MarkDelivered", "seller", {"note": "left at the door"}, "none", 1),
            ("RefundEscrow", "system", {}, "none", 24),
            ("RefundEscrow", "system", {}, "none", 24 * 8),
            ("ConfirmSettlement", "system", {}, "none", 1),
        ),
    ),
    (
        "STRIPE",
        {"delivered_timeout_action": "release"},
        (
            ("CreateEscrow", "buyer", {}, "all", 0),
            ("CancelEscrow", "system", {"reason": "TIMEOUT"}, "none", 24),
            ("CancelEscrow", "system", {"reason": "TIMEOUT"}, "none", 24 * 8),
            ("ConfirmFunds", "system", {}, "none", 1),
        ),
    ),
    (  # a dispute resolved by release, then a compliance cancellation refused (terminal)
        "STRIPE",
        {},
        (
            ("CreateEscrow", "buyer", {"milestones": []}, "all", 0),
            ("ConfirmFunds", "system", {"providerPaymentId": "pi_0"}, "none", 1),
            ("RaiseDispute", "seller", {}, "none", 1),
            ("ResolveDispute", "admin", {"resolution": "RELEASE"}, "payout", 1),
            ("ConfirmSettlement", "system", {}, "none", 1),
            ("CancelEscrow", "system", {"reason": "COMPLIANCE_REJECTED"}, "none", 1),
        ),
    ),
)


def _context(rng: random.Random, rail: str, which: str | None = None) -> DecisionContext | None:
    payout = (
        StripeAccountDestination(account_id="acct_seller")
        if rail == "STRIPE"
        else WalletDestination(address="0xsellerwallet")
    )
    contexts = {
        "none": None,
        "payout": DecisionContext(seller_payout=payout),
        "all": DecisionContext(
            kyc_verified_user_ids=frozenset({BUYER, SELLER}), seller_payout=payout
        ),
        "kyc": DecisionContext(kyc_verified_user_ids=frozenset({BUYER, SELLER})),
    }
    return contexts[which if which is not None else rng.choice(sorted(contexts))]


def _step(
    line: dict[str, Any],
    wire: dict[str, Any],
    state: Escrow | None,
    now: datetime,
    settings: DomainSettings,
    context: DecisionContext | None,
) -> Escrow | None:
    """Decide ``wire`` and fill ``line`` with everything that came out."""
    line["now"] = now.isoformat()
    line["command"] = wire
    try:
        command = parse_command(json.loads(json.dumps(wire)))
    except CommandInvalid as exc:
        line["invalid"] = exc.errors
        return state
    decision = decide(state, command, now, settings, context)
    line["fingerprint"] = command_fingerprint(command)
    line["duplicate"] = decision.duplicate
    line["rejection"] = (
        None
        if decision.rejection is None
        else decision.rejection.model_dump(mode="json", by_alias=True)
    )
    line["events"] = [json.loads(encode_event(ev)) for ev in decision.events]
    line["eventsUnset"] = [
        _sha(ev.model_dump_json(by_alias=True, exclude_unset=True).encode())
        for ev in decision.events
    ]
    after = decision.state_after(state)
    line["table"] = None if after is None else _sha(after.model_dump_json(by_alias=True).encode())
    if decision.events and not decision.duplicate:
        assert after is not None
        _check_fold(state, decision.events, after)
    return after


def _check_fold(state: Escrow | None, events: list[Event], after: Escrow) -> None:
    """The evolve path: the events read back from JSON (snapshot and remembered commands
    included) fold onto ``state`` to the very snapshot ``decide`` attached."""
    for event in events:
        wire = json.loads(event.model_dump_json(by_alias=True))
        state = evolve(state, parse_event(wire))
    assert state is not None
    assert state.model_dump_json(by_alias=True) == after.model_dump_json(by_alias=True)


def _final(escrow_id: str, state: Escrow | None) -> dict[str, Any]:
    return {
        "escrow": escrow_id,
        "final": None if state is None else json.loads(state.model_dump_json(by_alias=True)),
    }


def _scripted(rng: random.Random, now: datetime) -> Iterator[dict[str, Any]]:
    for s, (rail, changes, steps) in enumerate(SCRIPTS):
        escrow_id = f"esc-s{s}"
        settings = DomainSettings(**changes)
        state: Escrow | None = None
        for step, (kind, role, overrides, which, hours) in enumerate(steps):
            now += timedelta(hours=hours)
            payload = _payload(rng, kind, role, state, rail, exact=True)
            if payload is not None and overrides is not None:
                payload = {**payload, **overrides}
            elif overrides is None:
                payload = None
            wire = _envelope(escrow_id, f"{escrow_id}-c{step}", kind, role, now, payload)
            line: dict[str, Any] = {"step": f"{escrow_id}/{step}"}
            state = _step(line, wire, state, now, settings, _context(rng, rail, which))
            yield line
        yield _final(escrow_id, state)


def golden_lines() -> Iterator[dict[str, Any]]:
    """Every step of the seeded run, as the golden file holds it."""
    rng = random.Random(SEED)
    yield from _scripted(rng, T0)
    now = T0
    for e in range(ESCROWS):
        escrow_id = f"esc-g{e}"
        rail = rng.choice(["STRIPE", "USDC_BASE"])
        settings = _settings(rng)
        state: Escrow | None = None
        sent: list[dict[str, Any]] = []
        after_end = 0
        for step in range(STEPS):
            if state is not None and state.status.value in ("RELEASED", "REFUNDED", "CANCELLED"):
                after_end += 1
                if after_end > 4:
                    break
            now += rng.choice([timedelta(seconds=1), timedelta(hours=3), timedelta(hours=3)])
            if rng.random() < 0.1:
                now += timedelta(days=8)  # past a payment or auto-refund deadline
            r = rng.random()
            if sent and r < 0.08:
                wire = dict(rng.choice(sent))  # a redelivery
            else:
                if state is None:
                    kind = "CreateEscrow"
                elif state.settlement is not None and r < 0.6:
                    awaiting = state.settlement.status.value == "AWAITING_PAYOUT_ACCOUNT"
                    kind = "ResumeSettlement" if awaiting else rng.choice(PENDING_NEXT)
                elif state.chargeback_open and r < 0.4:
                    kind = "CloseChargeback"
                elif r < 0.8:
                    kind = rng.choice(NEXT[state.status.value])
                else:
                    kind = rng.choice(TYPES)
                role = SENDER[kind] if rng.random() < 0.85 else rng.choice(ROLES)
                if kind in ("RefundEscrow", "ReleaseFunds", "CancelEscrow") and rng.random() < 0.2:
                    role = "system"
                command_id = f"{escrow_id}-c{step}"
                if sent and r < 0.12:  # a commandId reused for another command
                    command_id = rng.choice(sent)["commandId"]
                payload = _payload(rng, kind, role, state, rail)
                wire = _envelope(escrow_id, command_id, kind, role, now, payload)
            sent.append(wire)
            line: dict[str, Any] = {"step": f"{escrow_id}/{step}"}
            state = _step(line, wire, state, now, settings, _context(rng, rail))
            yield line
        yield _final(escrow_id, state)


def golden_text() -> str:
    """The golden file's text: one compact JSON object per line."""
    return "".join(
        json.dumps(line, separators=(",", ":"), ensure_ascii=False, sort_keys=True) + "\n"
        for line in golden_lines()
    )


if __name__ == "__main__":
    sys.stdout.write(golden_text())
