"""Double-entry ledger postings of an escrow, balances and the money invariants.

Postings are built without validating again (``_model.trusted``, issue 13): the posting id
is the event id, the currency the escrow's, the amounts come from validated events and the
escrow (lines of at most 31 characters: a sign and 30 digits), and every account name is a
fixed prefix and suffix around an id of at most 200 characters, well within 300.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from ._model import trusted
from .escrow import (
    ChargebackStatus,
    Escrow,
    EscrowStatus,
    LedgerLine,
    MilestoneStatus,
    Posting,
    PostingKind,
)
from .money import Provider


def holding_account(escrow_id: str) -> str:
    """The account holding an escrow's funds."""
    return f"escrow:{escrow_id}:holding"


def external_account(provider: Provider) -> str:
    """The account money arrives from (the provider, on the buyer's behalf)."""
    return f"external:{provider.value}"


def buyer_account(buyer_id: str) -> str:
    """The buyer's account; refunds are posted to it."""
    return f"buyer:{buyer_id}"


def seller_account(seller_id: str) -> str:
    """The seller's account; releases less the fee are posted to it."""
    return f"seller:{seller_id}"


PLATFORM_FEES_ACCOUNT = "platform:fees"
#: What the card networks took back from the platform on chargebacks not covered by funds
#: still in escrow (booked against a receivable of the party that got the money).
PLATFORM_CHARGEBACKS_ACCOUNT = "platform:chargebacks"


def seller_receivable_account(seller_id: str) -> str:
    """What the seller owes the platform (a chargeback after the funds were released)."""
    return f"seller:{seller_id}:receivable"


def buyer_receivable_account(buyer_id: str) -> str:
    """What the buyer owes the platform (a chargeback after the funds were refunded)."""
    return f"buyer:{buyer_id}:receivable"


def chargeback_receivable(escrow: Escrow, amount: int) -> tuple[int, str | None]:
    """What of a chargeback of ``amount`` the held funds do not cover, and who owes it: the
    seller when anything was released to them, else the buyer (refunded already)."""
    uncovered = max(0, amount - escrow.holding_amount)
    if uncovered == 0:
        return 0, None
    if escrow.released_amount > 0:
        return uncovered, seller_receivable_account(escrow.seller_id)
    return uncovered, buyer_receivable_account(escrow.buyer_id)


def chargeback_posting(
    escrow: Escrow, posting_id: str, at: datetime, account: str, amount: int, reverse: bool
) -> Posting:
    """platform:chargebacks -> the receivable (CHARGEBACK), or back (CHARGEBACK_REVERSED)."""
    sign = -1 if reverse else 1
    return trusted(
        Posting,
        posting_id=posting_id,
        kind=PostingKind.CHARGEBACK_REVERSED if reverse else PostingKind.CHARGEBACK,
        currency=escrow.currency,
        occurred_at=at,
        lines=(
            trusted(LedgerLine, account=PLATFORM_CHARGEBACKS_ACCOUNT, amount=-amount * sign),
            trusted(LedgerLine, account=account, amount=amount * sign),
        ),
    )


def funds_held_posting(
    escrow: Escrow, posting_id: str, at: datetime, provider: Provider, amount: int
) -> Posting:
    """external:{provider} -> escrow holding."""
    return trusted(
        Posting,
        posting_id=posting_id,
        kind=PostingKind.FUNDS_HELD,
        currency=escrow.currency,
        occurred_at=at,
        lines=(
            trusted(LedgerLine, account=external_account(provider), amount=-amount),
            trusted(LedgerLine, account=holding_account(escrow.escrow_id), amount=amount),
        ),
    )


def release_posting(
    escrow: Escrow, posting_id: str, at: datetime, amount: int, fee: int
) -> Posting:
    """escrow holding -> seller (amount - fee) and platform fees (fee)."""
    lines = [
        trusted(LedgerLine, account=holding_account(escrow.escrow_id), amount=-amount),
        trusted(LedgerLine, account=seller_account(escrow.seller_id), amount=amount - fee),
    ]
    if fee:
        lines.append(trusted(LedgerLine, account=PLATFORM_FEES_ACCOUNT, amount=fee))
    return trusted(
        Posting,
        posting_id=posting_id,
        kind=PostingKind.RELEASE,
        currency=escrow.currency,
        occurred_at=at,
        lines=tuple(lines),
    )


def refund_posting(
    escrow: Escrow, posting_id: str, at: datetime, amount: int, chargeback: bool = False
) -> Posting:
    """escrow holding -> buyer (REFUND; CHARGEBACK_REFUND when the card network did it)."""
    return trusted(
        Posting,
        posting_id=posting_id,
        kind=PostingKind.CHARGEBACK_REFUND if chargeback else PostingKind.REFUND,
        currency=escrow.currency,
        occurred_at=at,
        lines=(
            trusted(LedgerLine, account=holding_account(escrow.escrow_id), amount=-amount),
            trusted(LedgerLine, account=buyer_account(escrow.buyer_id), amount=amount),
        ),
    )


def ledger_balances(escrow: Escrow) -> dict[str, int]:
    """Balance of every account touched by the escrow's postings (positive = holds money)."""
    balances: dict[str, int] = defaultdict(int)
    for posting in escrow.ledger:
        for line in posting.lines:
            balances[line.account] += line.amount
    return dict(balances)


def check_invariants(escrow: Escrow) -> list[str]:
    """Every violated money/state invariant of `escrow`, as readable strings (empty = fine)."""
    problems: list[str] = []
    for posting in escrow.ledger:
        total = sum(line.amount for line in posting.lines)
        if total != 0:
            problems.append(f"posting {posting.posting_id} sums to {total}, not 0")
        if posting.currency != escrow.currency:
            problems.append(f"posting {posting.posting_id} in {posting.currency}")
    balances = ledger_balances(escrow)
    holding = balances.get(holding_account(escrow.escrow_id), 0)
    if holding < 0:
        problems.append(f"holding balance is negative: {holding}")
    if holding != escrow.holding_amount:
        problems.append(
            f"holding balance {holding} != funded - released - refunded {escrow.holding_amount}"
        )
    if escrow.released_amount + escrow.refunded_amount > escrow.funded_amount:
        problems.append("released + refunded exceeds funded")
    if escrow.funded_amount not in (0, escrow.amount):
        problems.append(f"funded amount {escrow.funded_amount} is neither 0 nor the amount")
    seller = balances.get(seller_account(escrow.seller_id), 0)
    fees = balances.get(PLATFORM_FEES_ACCOUNT, 0)
    if seller + fees != escrow.released_amount:
        problems.append("seller payouts plus fees differ from the released amount")
    if fees != escrow.fee_amount or fees > escrow.seller_fee:
        problems.append(f"platform fees {fees} inconsistent with sellerFee {escrow.seller_fee}")
    if balances.get(buyer_account(escrow.buyer_id), 0) != escrow.refunded_amount:
        problems.append("buyer refunds differ from the refunded amount")
    problems.extend(_status_problems(escrow, holding))
    problems.extend(_chargeback_problems(escrow, balances))
    if escrow.milestones:
        problems.extend(_milestone_problems(escrow))
    if len(escrow.recent_commands) > escrow.recent_commands_max:
        problems.append("recent command record exceeds its bound")
    return problems


def _status_problems(escrow: Escrow, holding: int) -> list[str]:
    problems: list[str] = []
    status = escrow.status
    if status in (EscrowStatus.AWAIT_FUNDS, EscrowStatus.CANCELLED) and escrow.funded_amount:
        problems.append(f"{status} escrow has funds")
    if (
        status
        in (
            EscrowStatus.FUNDS_HELD,
            EscrowStatus.DELIVERED,
            EscrowStatus.DISPUTED,
            EscrowStatus.RELEASED,
            EscrowStatus.REFUNDED,
        )
        and escrow.funded_amount != escrow.amount
    ):
        problems.append(f"{status} escrow is not fully funded")
    if status in (EscrowStatus.RELEASED, EscrowStatus.REFUNDED, EscrowStatus.CANCELLED):
        if holding != 0:
            problems.append(f"terminal escrow still holds {holding}")
        if escrow.settlement is not None:
            problems.append("terminal escrow has a pending settlement")
    if status == EscrowStatus.RELEASED and escrow.released_amount == 0:
        problems.append("RELEASED escrow released nothing")
    if status == EscrowStatus.REFUNDED and escrow.refunded_amount == 0:
        problems.append("REFUNDED escrow refunded nothing")
    if escrow.settlement is not None and escrow.settlement.amount > holding:
        problems.append("pending settlement exceeds the held amount")
    return problems


def _chargeback_problems(escrow: Escrow, balances: dict[str, int]) -> list[str]:
    """An open or lost chargeback's receivable is booked once, against one party; a won one,
    or none, leaves nothing booked; a lost one on held funds ended the escrow REFUNDED."""
    problems: list[str] = []
    chargeback = escrow.chargeback
    booked = balances.get(PLATFORM_CHARGEBACKS_ACCOUNT, 0)
    receivables = {
        seller_receivable_account(escrow.seller_id): balances.get(
            seller_receivable_account(escrow.seller_id), 0
        ),
        buyer_receivable_account(escrow.buyer_id): balances.get(
            buyer_receivable_account(escrow.buyer_id), 0
        ),
    }
    if chargeback is None or chargeback.status == ChargebackStatus.WON:
        expected, account = 0, None
    else:
        expected, account = chargeback.receivable_amount, chargeback.receivable_account
    if booked != -expected:
        problems.append(f"platform chargebacks {booked}, expected {-expected}")
    for name, balance in receivables.items():
        if balance != (expected if name == account else 0):
            problems.append(f"receivable {name} is {balance}")
    if chargeback is None:
        return problems
    if chargeback.receivable_amount > chargeback.amount:
        problems.append("chargeback receivable exceeds the chargeback")
    if escrow.funded_amount != escrow.amount:
        problems.append("chargeback on an escrow that is not funded")
    network_refunds = sum(
        line.amount
        for posting in escrow.ledger
        if posting.kind == PostingKind.CHARGEBACK_REFUND
        for line in posting.lines
        if line.amount > 0
    )
    if network_refunds and (
        chargeback.status != ChargebackStatus.LOST or escrow.status != EscrowStatus.REFUNDED
    ):
        problems.append("funds refunded by a chargeback that is not lost")
    return problems


def _milestone_problems(escrow: Escrow) -> list[str]:
    problems: list[str] = []
    if sum(m.amount for m in escrow.milestones) != escrow.amount:
        problems.append("milestone amounts do not sum to the amount")
    released = sum(m.amount for m in escrow.milestones if m.status == MilestoneStatus.RELEASED)
    refunded = sum(m.amount for m in escrow.milestones if m.status == MilestoneStatus.REFUNDED)
    if released != escrow.released_amount:
        problems.append("released milestones differ from the released amount")
    if refunded != escrow.refunded_amount:
        problems.append("refunded milestones differ from the refunded amount")
    return problems
