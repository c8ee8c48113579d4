"""Ours → provider (:mod:`escrow_stream.domain.reconcile`): every record of ours begun
since ``since`` must name an object the provider lists, with our amount and a status that
agrees; else ``missing_at_provider``, ``amount_differs`` or ``status_differs``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from escrow_stream.domain.reconcile_records import (
    CUSTODIAN,
    NO_TRANSFER,
    STRIPE,
    Difference,
    FundedEscrow,
    Kind,
    LedgerSettlement,
    Obj,
    OurDeposit,
    OurRecords,
    ProviderObject,
    SettlementEffect,
    UnmatchedFunds,
    their_side,
)

#: A PaymentIntent that funded an escrow has this status.
_SUCCEEDED = frozenset({"succeeded"})
#: Statuses of a transfer / refund that did (or will) move the money the ledger records.
_DONE = frozenset({"succeeded", "pending", "COMPLETED", "paid"})


@dataclass
class _Found:
    """Provider objects indexed for look-ups."""

    by_id: dict[tuple[str, Obj, str], ProviderObject] = field(default_factory=dict)
    by_settlement: dict[tuple[str, str], ProviderObject] = field(default_factory=dict)

    @classmethod
    def of(cls, objects: Iterable[ProviderObject]) -> _Found:
        found = cls()
        for o in objects:
            found.by_id[(o.provider, o.object, o.object_id)] = o
            if o.settlement_id and o.object in (Obj.TRANSFER, Obj.REFUND):
                found.by_settlement[(o.provider, o.settlement_id)] = o
        return found

    def get(self, provider: str, obj: Obj, object_id: str | None) -> ProviderObject | None:
        return None if object_id is None else self.by_id.get((provider, obj, object_id))

    def moved(self, provider: str, object_id: str) -> ProviderObject | None:
        """A transfer or refund with this id."""
        return self.get(provider, Obj.TRANSFER, object_id) or self.get(
            provider, Obj.REFUND, object_id
        )


def settlement_object(provider: str, kind: str) -> Obj:
    """What a settlement of ``kind`` makes: a Stripe Refund for a Stripe refund, else a
    transfer (Stripe release; custodian release and refund)."""
    return Obj.REFUND if provider == STRIPE and kind == "REFUND" else Obj.TRANSFER


def ours_at_provider(
    ours: OurRecords, objects: Iterable[ProviderObject], since: datetime
) -> list[Difference]:
    """Every record of ours begun since ``since``, kind by kind, against the provider's."""
    found = _Found.of(objects)
    return [
        *_escrows_at_provider(ours.escrows, found, since),
        *_settlements_at_provider(ours.settlements, found, since),
        *_ledger_at_provider(ours.ledger, found, since),
        *_deposits_at_provider(ours.deposits, found, since),
        *_unmatched_at_provider(ours.unmatched, found, since),
    ]


def _expect(
    found: _Found,
    provider: str,
    obj: Obj,
    object_id: str | None,
    escrow_id: str | None,
    amount: int | None,
    what: str,
    ok_status: frozenset[str] | None = None,
    by_settlement: str | None = None,
) -> list[Difference]:
    """The object our record names must be listed, with ``amount`` and an ``ok_status``."""
    o = found.get(provider, obj, object_id)
    if o is None and by_settlement is not None:
        o = found.by_settlement.get((provider, by_settlement))
    ours: dict[str, Any] = {"record": what, "amount": amount}
    if by_settlement is not None:
        ours["settlementId"] = by_settlement
    if o is None:
        detail = f"{what} names a {obj.value} the provider does not list"
        return [
            Difference(
                Kind.MISSING_AT_PROVIDER, provider, obj, object_id, escrow_id, ours, None, detail
            )
        ]
    if amount is not None and o.amount != amount:
        kind, detail = Kind.AMOUNT_DIFFERS, f"{what}: {amount} here, {o.amount} at the provider"
    elif ok_status is not None and o.status not in ok_status:
        kind, detail = Kind.STATUS_DIFFERS, f"{what}, but the provider's status is {o.status!r}"
    else:
        return []
    return [Difference(kind, provider, obj, o.object_id, escrow_id, ours, their_side(o), detail)]


def _escrows_at_provider(
    escrows: Iterable[FundedEscrow], found: _Found, since: datetime
) -> list[Difference]:
    """A funded escrow's payment (its amount; a PaymentIntent ``succeeded``); an unpaid Stripe
    escrow's PaymentIntent."""
    out: list[Difference] = []
    for e in escrows:
        if e.created_at < since:
            continue
        if e.provider == STRIPE and e.funded_payment_id:
            out += _expect(
                found,
                STRIPE,
                Obj.PAYMENT_INTENT,
                e.funded_payment_id,
                e.escrow_id,
                e.funded_amount,
                "escrow funded",
                _SUCCEEDED,
            )
        elif e.provider == STRIPE and e.instructions_id:  # unpaid: the PaymentIntent exists
            out += _expect(
                found, STRIPE, Obj.PAYMENT_INTENT, e.instructions_id, e.escrow_id, None, "escrow"
            )
        if e.provider == CUSTODIAN and e.funded_payment_id:
            out += _expect(
                found,
                CUSTODIAN,
                Obj.DEPOSIT,
                e.funded_payment_id,
                e.escrow_id,
                e.funded_amount,
                "escrow funded",
            )
    return out


def _settlements_at_provider(
    settlements: Iterable[SettlementEffect], found: _Found, since: datetime
) -> list[Difference]:
    """A succeeded settlement effect that moved money: its transfer / refund and amount (a
    custodian transfer may be found by its settlement id)."""
    out: list[Difference] = []
    for s in settlements:
        if s.created_at < since or s.state != "SUCCEEDED" or s.object_id == NO_TRANSFER:
            continue
        if s.amount == 0:
            continue
        obj = settlement_object(s.provider, s.kind)
        out += _expect(
            found,
            s.provider,
            obj,
            s.object_id,
            s.escrow_id,
            s.amount,
            "settlement effect",
            by_settlement=s.key if s.provider == CUSTODIAN else None,
        )
    return out


def _ledger_at_provider(
    ledger: Iterable[LedgerSettlement], found: _Found, since: datetime
) -> list[Difference]:
    """A settlement the ledger records: its transfer / refund, amount and a status that moved
    the money (refunds and custodian transfers)."""
    out: list[Difference] = []
    for entry in ledger:
        if entry.occurred_at < since or entry.reference == NO_TRANSFER:
            continue
        o = found.moved(entry.provider, entry.reference)
        obj = o.object if o is not None else Obj.TRANSFER
        if o is None and entry.provider == STRIPE and entry.event_type == "EscrowRefunded":
            obj = Obj.REFUND
        out += _expect(
            found,
            entry.provider,
            obj,
            entry.reference,
            entry.escrow_id,
            entry.amount,
            f"ledger {entry.event_type}",
            _DONE if obj is Obj.REFUND or entry.provider == CUSTODIAN else None,
        )
    return out


def _deposits_at_provider(
    deposits: Iterable[OurDeposit], found: _Found, since: datetime
) -> list[Difference]:
    """A custodian deposit we recorded, and its amount."""
    out: list[Difference] = []
    for d in deposits:
        if d.received_at < since:
            continue
        out += _expect(
            found, CUSTODIAN, Obj.DEPOSIT, d.deposit_id, d.escrow_id, d.amount, "deposit"
        )
    return out


def _unmatched_at_provider(
    unmatched: Iterable[UnmatchedFunds], found: _Found, since: datetime
) -> list[Difference]:
    """Unmatched funds: the payment that brought them and the return that sent them back."""
    out: list[Difference] = []
    for u in unmatched:
        if u.created_at < since:
            continue
        paid = Obj.PAYMENT_INTENT if u.provider == STRIPE else Obj.DEPOSIT
        out += _expect(
            found, u.provider, paid, u.object_id, u.escrow_id, u.amount, "unmatched funds"
        )
        if u.return_reference:
            back = Obj.REFUND if u.provider == STRIPE else Obj.TRANSFER
            out += _expect(
                found,
                u.provider,
                back,
                u.return_reference,
                u.escrow_id,
                u.amount,
                "unmatched funds return",
            )
    return out
