"""The providers' side of the reconciliation: list Stripe's and the custodian's objects.

Stripe: PaymentIntents, Transfers and Refunds created at or after a moment
(``created[gte]``), every page (the SDK's auto-pagination), through ``stripe_client``
(``STRIPE_API_BASE``).  Custodian: deposits and transfers (``CustodianClient.list_*``,
cursor pages).  Each becomes a :class:`~escrow_stream.domain.reconcile.ProviderObject`
with the metadata that says it is ours (see ``domain/reconcile.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import stripe

from escrow_stream.domain.reconcile import CUSTODIAN, STRIPE, UNMATCHED_PREFIX, Obj, ProviderObject
from escrow_stream.payments.custodian import CustodianClient

#: Objects per Stripe page (Stripe's maximum).
STRIPE_PAGE_SIZE = 100


def _metadata(obj: Any) -> dict[str, str]:
    metadata = getattr(obj, "metadata", None) or {}
    if isinstance(metadata, stripe.StripeObject):
        metadata = metadata.to_dict()
    return {str(k): str(v) for k, v in dict(metadata).items()}


def _created(seconds: Any) -> datetime:
    return datetime.fromtimestamp(int(seconds or 0), UTC)


def stripe_object(kind: Obj, obj: Any) -> ProviderObject:
    """One listed Stripe object (an SDK ``StripeObject``) as compared."""
    metadata = _metadata(obj)
    escrow_id = metadata.get("escrow_id") or getattr(obj, "transfer_group", None) or None
    amount = int(getattr(obj, "amount", 0) or 0)
    status = str(getattr(obj, "status", None) or "")
    if kind is Obj.PAYMENT_INTENT and status == "succeeded":
        amount = int(getattr(obj, "amount_received", None) or amount)
    if kind is Obj.TRANSFER and not status:
        status = "paid"  # a Transfer has no status: it exists once made
        if getattr(obj, "reversed", False):
            status = "reversed"
    intent = getattr(obj, "payment_intent", None)
    if intent is not None and not isinstance(intent, str):
        intent = getattr(intent, "id", None)
    return ProviderObject(
        provider=STRIPE,
        object=kind,
        object_id=str(obj.id),
        amount=amount,
        currency=str(getattr(obj, "currency", "") or "").upper(),
        status=status,
        created=_created(getattr(obj, "created", 0)),
        escrow_id=escrow_id,
        settlement_id=metadata.get("settlement_id") or None,
        unmatched_funds_id=metadata.get("unmatched_funds_id") or None,
        payment_intent=intent,
    )


async def list_stripe(client: stripe.StripeClient, since: datetime) -> list[ProviderObject]:
    """Every PaymentIntent, Transfer and Refund created at or after ``since``."""
    params: dict[str, Any] = {
        "created": {"gte": int(since.timestamp())},
        "limit": STRIPE_PAGE_SIZE,
    }
    found: list[ProviderObject] = []
    intents = await client.v1.payment_intents.list_async(params=params)  # type: ignore[arg-type]
    async for intent in intents.auto_paging_iter():
        found.append(stripe_object(Obj.PAYMENT_INTENT, intent))
    transfers = await client.v1.transfers.list_async(params=params)  # type: ignore[arg-type]
    async for transfer in transfers.auto_paging_iter():
        found.append(stripe_object(Obj.TRANSFER, transfer))
    refunds = await client.v1.refunds.list_async(params=params)  # type: ignore[arg-type]
    async for refund in refunds.auto_paging_iter():
        found.append(stripe_object(Obj.REFUND, refund))
    return found


def _iso(value: Any) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def custodian_deposit(item: dict[str, Any]) -> ProviderObject:
    return ProviderObject(
        provider=CUSTODIAN,
        object=Obj.DEPOSIT,
        object_id=str(item.get("id")),
        amount=int(str(item.get("amount") or 0)),
        currency=str(item.get("asset") or ""),
        status=str(item.get("status") or ""),
        created=_iso(item.get("createdAt")),
        escrow_id=item.get("reference") or None,
        confirmations=int(item.get("confirmations") or 0),
    )


def custodian_transfer(item: dict[str, Any]) -> ProviderObject:
    metadata = item.get("metadata") or {}
    reference = str(item.get("reference") or "")
    unmatched = (
        reference.removeprefix(UNMATCHED_PREFIX) if reference.startswith(UNMATCHED_PREFIX) else None
    )
    return ProviderObject(
        provider=CUSTODIAN,
        object=Obj.TRANSFER,
        object_id=str(item.get("id")),
        amount=int(str(item.get("amount") or 0)),
        currency=str(item.get("asset") or ""),
        status=str(item.get("status") or ""),
        created=_iso(item.get("createdAt")),
        escrow_id=metadata.get("escrow_id") or None,
        settlement_id=None if unmatched else reference or None,
        unmatched_funds_id=unmatched or metadata.get("unmatched_funds_id") or None,
    )


async def list_custodian(client: CustodianClient, since: datetime) -> list[ProviderObject]:
    """Every custodian deposit and transfer created at or after ``since``."""
    deposits = [custodian_deposit(d) for d in await client.list_deposits(since)]
    transfers = [custodian_transfer(t) for t in await client.list_transfers(since)]
    return deposits + transfers
