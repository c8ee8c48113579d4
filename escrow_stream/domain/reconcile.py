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

**Modules.** The records and differences are in ``reconcile_records.py``; the two directions
in ``reconcile_ours.py`` (ours → provider) and ``reconcile_theirs.py`` (provider → ours).
Import them from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from escrow_stream.domain.reconcile_ours import ours_at_provider, settlement_object
from escrow_stream.domain.reconcile_records import (
    CUSTODIAN,
    LISTING_MARGIN,
    NO_TRANSFER,
    STRIPE,
    UNMATCHED_PREFIX,
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
)
from escrow_stream.domain.reconcile_theirs import theirs_on_our_side

__all__ = [
    "CUSTODIAN",
    "LISTING_MARGIN",
    "NO_TRANSFER",
    "STRIPE",
    "UNMATCHED_PREFIX",
    "Difference",
    "FundedEscrow",
    "Kind",
    "LedgerSettlement",
    "Obj",
    "OurDeposit",
    "OurRecords",
    "ProviderObject",
    "SettlementEffect",
    "UnmatchedFunds",
    "compare",
    "settlement_object",
]


def compare(
    ours: OurRecords, theirs: Iterable[ProviderObject], since: datetime
) -> list[Difference]:
    """Every difference between our records and the provider's objects (module docstring);
    each (kind, provider, object id) once, in a stable order."""
    objects = list(theirs)
    differences: list[Difference] = []
    differences += ours_at_provider(ours, objects, since)
    differences += theirs_on_our_side(ours, objects, since)
    seen: set[tuple[Kind, str, str | None, str | None]] = set()
    unique: list[Difference] = []
    for d in differences:
        key = (d.kind, d.provider, d.object_id, d.escrow_id if d.object_id is None else None)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique
