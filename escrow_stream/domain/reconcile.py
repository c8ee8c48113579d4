"""Reconciliation with the payment providers: our records against theirs, a pure function.

:func:`compare` takes what PostgreSQL says we did (:class:`OurRecords`: funded escrows,
payment effects, ledger settlements, custodian deposits, unmatched funds) and what Stripe
and the custodian list (:class:`ProviderObject`), and returns every :class:`Difference`.
Loading both sides is I/O and lives elsewhere (``db/reconciliation.py``,
``payments/listing.py``); this module only decides.

**Which provider objects are ours.** An object is ours when it carries our metadata: an
``escrow_id`` (Stripe metadata or ``transfer_group``, custodian ``reference`` /
``metadata.escrow_id``), an ``unmatched_funds_id``, or a custodian reference
``unmatched:{fundsId}``.  Objects without any (other products on the same account) are not
compared.  Several deployments may share one database (the tests do): an escrow or funds row
that the database holds *for another deployment* (another commands topic) is that
deployment's to reconcile, and is skipped here (``OurRecords.foreign_escrows`` /
``foreign_funds``).  An escrow id the database does not know at all *is* a difference: the
object says it is ours and nobody recorded it.

**The window.** Provider → ours: objects created at or after ``since`` (ours are looked up
whatever their age).  Ours → provider: records begun at or after ``since``; the caller lists
provider objects from somewhat earlier (``LISTING_MARGIN``), so an object made moments
before the record that asked for it is still seen.

**Differences** (``kind``):

* ``missing_on_our_side`` — the provider has an object with our metadata that no record of
  ours accounts for (a paid PaymentIntent no escrow and no unmatched-funds row took; a
  Transfer/Refund/custodian transfer no settlement effect or unmatched return made; a
  custodian deposit never recorded).
* ``missing_at_provider`` — a record of ours names an object the provider does not list.
* ``amount_differs`` — both exist, the amounts (minor units) do not agree.
* ``status_differs`` — both exist, but the provider's status contradicts ours (an escrow
  funded by a PaymentIntent that is not ``succeeded``; a settled transfer that did not
  complete; money moved for an effect we recorded as FAILED).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

#: Provider objects are listed from this long before ``since`` (clock skew between us and
#: the provider; an object made just before the record of ours that names it).
LISTING_MARGIN = timedelta(days=1)
#: The providerReference of a settlement that moved no money (agents.payments.NO_TRANSFER).
NO_TRANSFER = "no-transfer"
#: A custodian transfer returning unmatched USDC has the reference ``unmatched:{fundsId}``.
UNMATCHED_PREFIX = "unmatched:"


class Kind(StrEnum):
    MISSING_ON_OUR_SIDE = "missing_on_our_side"
    MISSING_AT_PROVIDER = "missing_at_provider"
    AMOUNT_DIFFERS = "amount_differs"
    STATUS_DIFFERS = "status_differs"


class Obj(StrEnum):
    """The provider object kinds compared."""

    PAYMENT_INTENT = "payment_intent"
    TRANSFER = "transfer"
    REFUND = "refund"
    DEPOSIT = "deposit"


STRIPE = "stripe"
CUSTODIAN = "custodian"


@dataclass(frozen=True)
class ProviderObject:
    """One object as the provider lists it (amounts in minor units)."""

    provider: str  # stripe | custodian
    object: Obj
    object_id: str
    amount: int
    currency: str
    status: str
    created: datetime
    escrow_id: str | None = None  # from our metadata
    settlement_id: str | None = None  # Stripe metadata.settlement_id; custodian reference
    unmatched_funds_id: str | None = None
    payment_intent: str | None = None  # a Refund's PaymentIntent
    confirmations: int | None = None  # a custodian deposit's


@dataclass(frozen=True)
class FundedEscrow:
    """An escrow of this deployment and the provider payment that funded it (if any)."""

    escrow_id: str
    provider: str
    created_at: datetime
    instructions_id: str | None  # the PaymentIntent / deposit address we were given
    funded_payment_id: str | None  # the PaymentIntent / custodian deposit that funded it
    funded_amount: int


@dataclass(frozen=True)
class SettlementEffect:
    """A settlement effect of ``payment_effects`` (key = the settlement id)."""

    key: str
    escrow_id: str
    provider: str
    kind: str  # RELEASE | REFUND
    state: str  # STARTED | SUCCEEDED | FAILED
    object_id: str | None
    amount: int  # the payout amount: what the transfer / refund moves
    created_at: datetime


@dataclass(frozen=True)
class LedgerSettlement:
    """A settlement the ledger records (EscrowReleased, MilestoneReleased, EscrowRefunded)."""

    event_id: str
    escrow_id: str
    event_type: str
    provider: str
    reference: str  # the provider's object id
    amount: int  # what moved: payoutAmount of a release, amount of a refund
    occurred_at: datetime


@dataclass(frozen=True)
class OurDeposit:
    deposit_id: str
    escrow_id: str
    amount: int
    status: str
    received_at: datetime


@dataclass(frozen=True)
class UnmatchedFunds:
    funds_id: str
    provider: str
    object_id: str  # the PaymentIntent / custodian deposit
    escrow_id: str | None
    amount: int
    status: str
    return_reference: str | None  # the Stripe Refund / custodian transfer that returned it
    created_at: datetime


@dataclass(frozen=True)
class OurRecords:
    escrows: tuple[FundedEscrow, ...] = ()
    settlements: tuple[SettlementEffect, ...] = ()
    ledger: tuple[LedgerSettlement, ...] = ()
    deposits: tuple[OurDeposit, ...] = ()
    unmatched: tuple[UnmatchedFunds, ...] = ()
    #: escrow ids / funds ids the database holds for other deployments (skipped)
    foreign_escrows: frozenset[str] = frozenset()
    foreign_funds: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Difference:
    kind: Kind
    provider: str
    object: Obj
    object_id: str | None
    escrow_id: str | None
    ours: dict[str, Any] | None
    theirs: dict[str, Any] | None
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "provider": self.provider,
            "object": self.object.value,
            "objectId": self.object_id,
            "escrowId": self.escrow_id,
            "ours": self.ours,
            "theirs": self.theirs,
            "detail": self.detail,
        }


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


def _theirs(o: ProviderObject) -> dict[str, Any]:
    return {"amount": o.amount, "currency": o.currency, "status": o.status}


def settlement_object(provider: str, kind: str) -> Obj:
    """What a settlement of ``kind`` makes: a Stripe Refund for a Stripe refund, else a
    transfer (Stripe release; custodian release and refund)."""
    return Obj.REFUND if provider == STRIPE and kind == "REFUND" else Obj.TRANSFER


def compare(
    ours: OurRecords, theirs: Iterable[ProviderObject], since: datetime
) -> list[Difference]:
    """Every difference between our records and the provider's objects (module docstring);
    each (kind, provider, object id) once, in a stable order."""
    objects = list(theirs)
    found = _Found.of(objects)
    differences: list[Difference] = []
    differences += _ours_at_provider(ours, found, since)
    differences += _theirs_on_our_side(ours, objects, since)
    seen: set[tuple[Kind, str, str | None, str | None]] = set()
    unique: list[Difference] = []
    for d in differences:
        key = (d.kind, d.provider, d.object_id, d.escrow_id if d.object_id is None else None)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


# -- ours → provider ---------------------------------------------------------------------


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
        return [
            Difference(
                Kind.MISSING_AT_PROVIDER,
                provider,
                obj,
                object_id,
                escrow_id,
                ours,
                None,
                f"{what} names a {obj.value} the provider does not list",
            )
        ]
    if amount is not None and o.amount != amount:
        return [
            Difference(
                Kind.AMOUNT_DIFFERS,
                provider,
                obj,
                o.object_id,
                escrow_id,
                ours,
                _theirs(o),
                f"{what}: {amount} here, {o.amount} at the provider",
            )
        ]
    if ok_status is not None and o.status not in ok_status:
        return [
            Difference(
                Kind.STATUS_DIFFERS,
                provider,
                obj,
                o.object_id,
                escrow_id,
                ours,
                _theirs(o),
                f"{what}, but the provider's status is {o.status!r}",
            )
        ]
    return []


def _ours_at_provider(ours: OurRecords, found: _Found, since: datetime) -> list[Difference]:
    out: list[Difference] = []
    succeeded = frozenset({"succeeded"})
    for e in ours.escrows:
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
                succeeded,
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
    for s in ours.settlements:
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
    for entry in ours.ledger:
        if entry.occurred_at < since or entry.reference == NO_TRANSFER:
            continue
        o = found.moved(entry.provider, entry.reference)
        obj = o.object if o is not None else Obj.TRANSFER
        if o is None and entry.provider == STRIPE and entry.event_type == "EscrowRefunded":
            obj = Obj.REFUND
        done = frozenset({"succeeded", "pending", "COMPLETED", "paid"})
        out += _expect(
            found,
            entry.provider,
            obj,
            entry.reference,
            entry.escrow_id,
            entry.amount,
            f"ledger {entry.event_type}",
            done if obj is Obj.REFUND or entry.provider == CUSTODIAN else None,
        )
    for d in ours.deposits:
        if d.received_at < since:
            continue
        out += _expect(
            found, CUSTODIAN, Obj.DEPOSIT, d.deposit_id, d.escrow_id, d.amount, "deposit"
        )
    for u in ours.unmatched:
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


# -- provider → ours ---------------------------------------------------------------------


def _theirs_on_our_side(
    ours: OurRecords, objects: list[ProviderObject], since: datetime
) -> list[Difference]:
    funded: dict[tuple[str, str], FundedEscrow] = {
        (e.provider, e.funded_payment_id): e for e in ours.escrows if e.funded_payment_id
    }
    unmatched_by_object = {(u.provider, u.object_id): u for u in ours.unmatched}
    unmatched_by_id = {u.funds_id: u for u in ours.unmatched}
    returns = {
        (u.provider, u.return_reference): u
        for u in ours.unmatched
        if u.return_reference is not None
    }
    effects_by_key = {s.key: s for s in ours.settlements}
    effects_by_object = {(s.provider, s.object_id): s for s in ours.settlements if s.object_id}
    ledger_refs = {(entry.provider, entry.reference) for entry in ours.ledger}
    deposits = {d.deposit_id: d for d in ours.deposits}
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
        out += _account_for(
            o,
            escrow_id,
            funded,
            unmatched_by_object,
            unmatched_by_id,
            returns,
            effects_by_key,
            effects_by_object,
            ledger_refs,
            deposits,
        )
    return out


def _account_for(
    o: ProviderObject,
    escrow_id: str | None,
    funded: dict[tuple[str, str], FundedEscrow],
    unmatched_by_object: dict[tuple[str, str], UnmatchedFunds],
    unmatched_by_id: dict[str, UnmatchedFunds],
    returns: dict[tuple[str, str], UnmatchedFunds],
    effects_by_key: dict[str, SettlementEffect],
    effects_by_object: dict[tuple[str, str], SettlementEffect],
    ledger_refs: set[tuple[str, str]],
    deposits: dict[str, OurDeposit],
) -> list[Difference]:
    """Our record that accounts for one provider object with our metadata, compared."""

    def missing(detail: str) -> list[Difference]:
        return [
            Difference(
                Kind.MISSING_ON_OUR_SIDE,
                o.provider,
                o.object,
                o.object_id,
                escrow_id,
                None,
                _theirs(o),
                detail,
            )
        ]

    def amount(record: str, ours_amount: int) -> list[Difference]:
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
                _theirs(o),
                f"{record}: {ours_amount} here, {o.amount} at the provider",
            )
        ]

    if o.object is Obj.PAYMENT_INTENT or o.object is Obj.DEPOSIT:
        if o.object is Obj.PAYMENT_INTENT and o.status != "succeeded":
            return []  # no money arrived
        if o.object is Obj.DEPOSIT and o.status not in ("CONFIRMED", "COMPLETED"):
            return []  # not final at the custodian: nobody reports it yet
        escrow = funded.get((o.provider, o.object_id))
        if escrow is not None:
            return amount("escrow funded", escrow.funded_amount)
        funds = unmatched_by_object.get((o.provider, o.object_id))
        if funds is not None:
            return amount("unmatched funds", funds.amount)
        deposit = deposits.get(o.object_id) if o.object is Obj.DEPOSIT else None
        if deposit is not None:  # recorded, screening or frozen: accounted for
            return amount("deposit", deposit.amount)
        return missing(f"paid {o.object.value}: no funded escrow and no unmatched-funds row")

    # a transfer or a refund: money that left
    if o.status in ("failed", "canceled", "FAILED"):
        return []  # it moved nothing
    if o.unmatched_funds_id is not None:
        funds = unmatched_by_id.get(o.unmatched_funds_id)
        if funds is None:
            return missing(f"return of unmatched funds {o.unmatched_funds_id} we never recorded")
        return amount("unmatched funds", funds.amount)
    effect = effects_by_key.get(o.settlement_id or "") or effects_by_object.get(
        (o.provider, o.object_id)
    )
    if effect is not None:
        if effect.state == "FAILED":
            return [
                Difference(
                    Kind.STATUS_DIFFERS,
                    o.provider,
                    o.object,
                    o.object_id,
                    escrow_id,
                    {"record": "settlement effect", "state": effect.state, "key": effect.key},
                    _theirs(o),
                    "money moved for a settlement we recorded as FAILED",
                )
            ]
        return amount("settlement effect", effect.amount)
    funds = returns.get((o.provider, o.object_id))
    if funds is not None:
        return amount("unmatched funds return", funds.amount)
    if (o.provider, o.object_id) in ledger_refs:
        return []
    return missing(
        f"{o.object.value} with our metadata: no settlement effect, ledger entry or return"
    )
