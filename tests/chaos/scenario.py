"""Command scripts for the fault tests, and the outcome the domain says each must have.

The expected outcomes come from replaying each escrow's commands, in the order they were
produced (which is the order its partition delivers them), through the same pure domain
core; the worker must end with exactly those events and rejections however often it was
killed.  Outcomes do not depend on the clock here: no deadline is reached in a test run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from escrow_stream.domain import (
    DecisionContext,
    DomainSettings,
    Escrow,
    PayoutDestination,
    StripeAccountDestination,
    WalletDestination,
    decide,
    parse_command,
)
from escrow_stream.tables.outcomes import record_key
from tests.builders import TEST_PAYOUTS, wire_command

BUYER = {"id": "buyer-c", "role": "user"}
SELLER = {"id": "seller-c", "role": "user"}
ADMIN = {"id": "admin-c", "role": "admin"}
SYSTEM = {"id": "payments-agent", "role": "system"}
AMOUNT, FEE = 25_000, 1_000
#: The seller's ACTIVE payout accounts: the fault tests set them up with ``activate_payouts``
#: and the processor looks them up for every release.
SELLER_PAYOUTS: dict[str, PayoutDestination] = {
    "STRIPE": StripeAccountDestination(account_id=TEST_PAYOUTS["STRIPE"]),
    "USDC_BASE": WalletDestination(address=TEST_PAYOUTS["USDC_BASE"]),
}


def _create(e: str, rail: str) -> dict[str, Any]:
    return wire_command(
        "CreateEscrow",
        e,
        BUYER,
        {
            "offerId": f"offer-{e}",
            "contractId": f"contract-{e}",
            "buyerId": BUYER["id"],
            "sellerId": SELLER["id"],
            "rail": rail,
            "amount": str(AMOUNT),
            "currency": "USD" if rail == "STRIPE" else "USDC",
            "sellerFee": str(FEE),
        },
    )


def _provider(rail: str) -> str:
    return "stripe" if rail == "STRIPE" else "custodian"


def _funds(e: str, rail: str) -> dict[str, Any]:
    payload = {
        "provider": _provider(rail),
        "providerPaymentId": f"pay-{e}",
        "amount": str(AMOUNT),
        "currency": "USD" if rail == "STRIPE" else "USDC",
    }
    return wire_command("ConfirmFunds", e, SYSTEM, payload)


def _settled(e: str, rail: str, amount: int, n: int, kind: str = "release") -> dict[str, Any]:
    payload = {
        "settlementId": f"escrow-{kind}:{e}:all:{n}",
        "provider": _provider(rail),
        "providerReference": f"ref-{e}-{n}",
        "amount": str(amount),
    }
    return wire_command("ConfirmSettlement", e, SYSTEM, payload)


def _failed(e: str, n: int = 1) -> dict[str, Any]:
    payload = {
        "settlementId": f"escrow-release:{e}:all:{n}",
        "errorCode": "timeout",
        "errorMessage": "provider timed out",
        "retryable": True,
    }
    return wire_command("RecordSettlementFailure", e, SYSTEM, payload)


def escrow_script(e: str, rng: random.Random) -> list[dict[str, Any]]:
    """10-13 commands for one escrow: a lifecycle with rejections and duplicates mixed in."""
    rail = rng.choice(["STRIPE", "USDC_BASE"])
    create = _create(e, rail)
    funds = _funds(e, rail)
    early_release = wire_command("ReleaseFunds", e, BUYER)  # rejected: not delivered yet
    script = [
        create,
        wire_command("MarkDelivered", e, BUYER),  # wrong actor
        early_release,
        funds,
        dict(funds),  # the same commandId again: a duplicate
        wire_command("MarkDelivered", e, SELLER, {"note": "delivered"}),
        dict(early_release),  # a rejected command again, now that the state has changed
    ]
    ending = rng.choice(["release", "release-after-failure", "refund", "dispute"])
    if ending == "release":
        script += [
            wire_command("ReleaseFunds", e, BUYER),
            wire_command("CancelEscrow", e, BUYER, {"reason": "BUYER_CANCELLED"}),  # pending
            _settled(e, rail, AMOUNT - FEE, 1),
        ]
    elif ending == "release-after-failure":
        script += [
            wire_command("ReleaseFunds", e, BUYER),
            _failed(e),
            wire_command("ReleaseFunds", e, ADMIN),
            _settled(e, rail, AMOUNT - FEE, 2),
        ]
    elif ending == "refund":
        script += [
            wire_command("RefundEscrow", e, SELLER, {"reason": "cannot deliver"}),
            _settled(e, rail, AMOUNT, 1, kind="refund"),
        ]
    else:
        script += [
            wire_command("RaiseDispute", e, BUYER, {"reason": "broken"}),
            wire_command("ResolveDispute", e, ADMIN, {"resolution": "RELEASE", "reason": "ok"}),
            _settled(e, rail, AMOUNT - FEE, 1),
        ]
    script.append(wire_command("CancelEscrow", e, BUYER, {"reason": "BUYER_CANCELLED"}))
    return script


def interleave(scripts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round-robin over the escrows, so every escrow is in flight at once."""
    out: list[dict[str, Any]] = []
    for i in range(max(len(s) for s in scripts)):
        out += [s[i] for s in scripts if i < len(s)]
    return out


@dataclass
class Expected:
    """What the worker must have produced."""

    event_ids: dict[str, tuple[str, int, str, str]] = field(default_factory=dict)
    rejections: dict[str, str] = field(default_factory=dict)  # commandId -> code
    no_ops: set[str] = field(default_factory=set)
    final: dict[str, Escrow] = field(default_factory=dict)


def expected_outcomes(commands: list[dict[str, Any]], rules: DomainSettings) -> Expected:
    """Replay every escrow's commands in order, as the processor decides them."""
    now = datetime.now(UTC)
    expected = Expected()
    states: dict[str, Escrow | None] = {}
    recorded: dict[str, str | None] = {}  # record key -> rejection code, None for a no-op
    for raw in commands:
        command = parse_command(raw)
        key = record_key(command)
        if key in recorded:  # a rejected / no-op command seen again keeps its outcome
            continue
        state = states.get(command.escrow_id)
        payout = SELLER_PAYOUTS[state.rail] if state is not None else None
        decision = decide(state, command, now, rules, DecisionContext(seller_payout=payout))
        if decision.rejection is not None:
            recorded[key] = decision.rejection.code.value
            expected.rejections[command.command_id] = decision.rejection.code.value
            continue
        if not decision.events:
            recorded[key] = None
            expected.no_ops.add(command.command_id)
            continue
        for event in decision.events:
            expected.event_ids[str(event.event_id)] = (
                event.escrow_id,
                event.version,
                event.type,
                str(event.causation_id),
            )
        states[command.escrow_id] = decision.state_after(state)
    expected.final = {k: v for k, v in states.items() if v is not None}
    return expected
