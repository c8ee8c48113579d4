"""Provider → ours (:mod:`escrow_stream.domain.reconcile`): every provider object with our
metadata, created since ``since``, must be accounted for by a record of ours; else
``missing_on_our_side``, ``amount_differs`` or ``status_differs``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from escrow_stream.domain.reconcile_records import (
    Difference,
    FundedEscrow,
    Kind,
    Obj,
    OurDeposit,
    OurRecords,
    ProviderObject,
    SettlementEffect,
    UnmatchedFunds,
    their_side,
)


@dataclass(frozen=True)
class _Recorded:
    """Our records indexed by what a provider object names."""

    funded: dict[tuple[str, str], FundedEscrow]
    unmatched_by_object: dict[tuple[str, str], UnmatchedFunds]
    unmatched_by_id: dict[str, UnmatchedFunds]
    returns: dict[tuple[str, str], UnmatchedFunds]
    effects_by_key: dict[str, SettlementEffect]
    effects_by_object: dict[tuple[str, str], SettlementEffect]
    ledger_refs: set[tuple[str, str]]
    deposits: dict[str, OurDeposit]

    @classmethod
    def of(cls, ours: OurRecords) -> _Recorded:
        return cls(
            funded={
                (e.provider, e.funded_payment_id): e for e in ours.escrows if e.funded_payment_id
            },
            unmatched_by_object={(u.provider, u.object_id): u for u in ours.unmatched},
            unmatched_by_id={u.funds_id: u for u in ours.unmatched},
            returns={
                (u.provider, u.return_reference): u
                for u in ours.unmatched
                if u.return_reference is not None
            },
            effects_by_key={s.key: s for s in ours.settlements},
            effects_by_object={
                (s.provider, s.object_id): s for s in ours.settlements if s.object_id
            },
            ledger_refs={(entry.provider, entry.reference) for entry in ours.ledger},
            deposits={d.deposit_id: d for d in ours.deposits},
        )


def theirs_on_our_side(
    ours: OurRecords, objects: list[ProviderObject], since: datetime
) -> list[Difference]:
    """Every provider object of ours (not another deployment's) created since ``since``,
    against the record of ours that accounts for it."""
    recorded = _Recorded.of(ours)
    intents = {o.object_id: o for o in objects if o.object is Obj.PAYMENT_INTENT}

    out: list[Difference] = []
    for o in objects:
        if o.created < since:
            continue
        escrow_id = o.escrow_id
        if escrow_id is None and o.payment_intent in intents:
            escrow_id = intents[o.payment_intent].escrow_id
        if escrow_id is None and o.unmatched_funds_id is None:
            continue  # not ours: no metadata of ours
        if escrow_id in ours.foreign_escrows or o.unmatched_funds_id in ours.foreign_funds:
            continue  # another deployment's
        out += _account_for(o, escrow_id, recorded)
    return out


def _account_for(o: ProviderObject, escrow_id: str | None, recorded: _Recorded) -> list[Difference]:
    """Our record that accounts for one provider object with our metadata, compared."""
    if o.object is Obj.PAYMENT_INTENT or o.object is Obj.DEPOSIT:
        return _account_for_payment(o, escrow_id, recorded)
    return _account_for_transfer(o, escrow_id, recorded)


def _account_for_payment(
    o: ProviderObject, escrow_id: str | None, recorded: _Recorded
) -> list[Difference]:
    """A PaymentIntent or custodian deposit: money that arrived, taken by a funded escrow, an
    unmatched-funds row or (a deposit) a recorded deposit."""
    if o.object is Obj.PAYMENT_INTENT and o.status != "succeeded":
        return []  # no money arrived
    if o.object is Obj.DEPOSIT and o.status not in ("CONFIRMED", "COMPLETED"):
        return []  # not final at the custodian: nobody reports it yet
    escrow = recorded.funded.get((o.provider, o.object_id))
    if escrow is not None:
        return _amount(o, escrow_id, "escrow funded", escrow.funded_amount)
    funds = recorded.unmatched_by_object.get((o.provider, o.object_id))
    if funds is not None:
        return _amount(o, escrow_id, "unmatched funds", funds.amount)
    deposit = recorded.deposits.get(o.object_id) if o.object is Obj.DEPOSIT else None
    if deposit is not None:  # recorded, screening or frozen: accounted for
        return _amount(o, escrow_id, "deposit", deposit.amount)
    return _missing(
        o, escrow_id, f"paid {o.object.value}: no funded escrow and no unmatched-funds row"
    )


def _account_for_transfer(
    o: ProviderObject, escrow_id: str | None, recorded: _Recorded
) -> list[Difference]:
    """A transfer or a refund: money that left, by a return of unmatched funds, a settlement
    effect (not FAILED) or a settlement the ledger records."""
    if o.status in ("failed", "canceled", "FAILED"):
        return []  # it moved nothing
    if o.unmatched_funds_id is not None:
        funds = recorded.unmatched_by_id.get(o.unmatched_funds_id)
        if funds is None:
            return _missing(
                o, escrow_id, f"return of unmatched funds {o.unmatched_funds_id} we never recorded"
            )
        return _amount(o, escrow_id, "unmatched funds", funds.amount)
    effect = recorded.effects_by_key.get(o.settlement_id or "") or recorded.effects_by_object.get(
        (o.provider, o.object_id)
    )
    if effect is not None:
        return _against_effect(o, escrow_id, effect)
    funds = recorded.returns.get((o.provider, o.object_id))
    if funds is not None:
        return _amount(o, escrow_id, "unmatched funds return", funds.amount)
    if (o.provider, o.object_id) in recorded.ledger_refs:
        return []
    return _missing(
        o,
        escrow_id,
        f"{o.object.value} with our metadata: no settlement effect, ledger entry or return",
    )


def _against_effect(
    o: ProviderObject, escrow_id: str | None, effect: SettlementEffect
) -> list[Difference]:
    """A transfer / refund of a settlement effect: money must not move for a FAILED one."""
    if effect.state == "FAILED":
        return [
            Difference(
                Kind.STATUS_DIFFERS,
                o.provider,
                o.object,
                o.object_id,
                escrow_id,
                {"record": "settlement effect", "state": effect.state, "key": effect.key},
                their_side(o),
                "money moved for a settlement we recorded as FAILED",
            )
        ]
    return _amount(o, escrow_id, "settlement effect", effect.amount)


def _missing(o: ProviderObject, escrow_id: str | None, detail: str) -> list[Difference]:
    """No record of ours accounts for ``o``."""
    return [
        Difference(
            Kind.MISSING_ON_OUR_SIDE,
            o.provider,
            o.object,
            o.object_id,
            escrow_id,
            None,
            their_side(o),
            detail,
        )
    ]


def _amount(
    o: ProviderObject, escrow_id: str | None, record: str, ours_amount: int
) -> list[Difference]:
    """Our ``record`` accounts for ``o``: the amounts must agree."""
    if ours_amount == o.amount:
        return []
    return [
        Difference(
            Kind.AMOUNT_DIFFERS,
            o.provider,
            o.object,
            o.object_id,
            escrow_id,
            {"record": record, "amount": ours_amount},
            their_side(o),
            f"{record}: {ours_amount} here, {o.amount} at the provider",
        )
    ]
