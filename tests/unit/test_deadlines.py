"""An escrow's deadlines (pure): the timeout and the hold warning come due exactly when the
domain's own checks say so, for any escrow at any time."""

from __future__ import annotations

from datetime import datetime, timedelta

from domain_support import T0, days, reach
from hypothesis import given, settings
from hypothesis import strategies as st

from escrow_stream.agents.timeouts import due_timeouts
from escrow_stream.domain import DomainSettings, Escrow, EscrowStatus, Rail, timeout_command_for
from escrow_stream.domain.escrow import Chargeback, ChargebackStatus
from escrow_stream.domain.timeouts import (
    NO_DEADLINES,
    Deadlines,
    deadlines_of,
    hold_warning_after,
    holds_card_funds_past,
    timeout_deadline,
)
from escrow_stream.tables import escrows as escrow_table


def _state(status: str, pending: bool = False) -> Escrow:
    run = reach(status, pending=pending, milestones=False)
    assert run.state is not None
    return run.state


#: Real escrows in every status (with and without a settlement pending), to vary from.
TEMPLATES = [
    _state("AWAIT_FUNDS"),
    _state("CANCELLED"),
    _state("FUNDS_HELD"),
    _state("FUNDS_HELD", pending=True),
    _state("DELIVERED"),
    _state("DELIVERED", pending=True),
    _state("DISPUTED"),
    _state("RELEASED"),
    _state("REFUNDED"),
]
SETTLEMENT = TEMPLATES[3].settlement
PAYMENT = TEMPLATES[2].payment
assert SETTLEMENT is not None and PAYMENT is not None

moments = st.datetimes(min_value=datetime(2024, 12, 1), max_value=datetime(2025, 6, 1)).map(
    lambda t: t.replace(tzinfo=T0.tzinfo)
)
maybe_moment = st.none() | moments
chargebacks = st.none() | st.sampled_from(list(ChargebackStatus)).map(
    lambda status: Chargeback(
        dispute_id="dp_1", status=status, amount=100, reason="fraudulent", opened_at=T0
    )
)


#: Statuses and settlements drawn more often where a timeout can come due.
TIMEABLE_STATUSES = [EscrowStatus.AWAIT_FUNDS, EscrowStatus.DELIVERED, EscrowStatus.FUNDS_HELD]


@st.composite
def escrows(draw: st.DrawFn, timeable: bool = False) -> Escrow:
    """An escrow with every field the deadlines read drawn at random (consistent or not:
    the functions are pure, and must agree for any value); `timeable`: mostly escrows a
    timeout can come due for."""
    base = draw(st.sampled_from(TEMPLATES))
    funded = draw(st.integers(min_value=0, max_value=20_000))
    payment = draw(
        st.none() | maybe_moment.map(lambda t: PAYMENT.model_copy(update={"funded_at": t}))
    )
    statuses = TIMEABLE_STATUSES if timeable else list(EscrowStatus)
    settlements = st.sampled_from([None] * (4 if timeable else 1) + [SETTLEMENT])
    update = {
        "status": draw(st.sampled_from(statuses) | st.sampled_from(list(EscrowStatus))),
        "rail": draw(st.sampled_from(list(Rail))),
        "expires_at": draw(moments),
        "auto_refund_at": draw(moments if timeable else maybe_moment),
        "release_approved_at": draw(st.none() if timeable else maybe_moment),
        "settlement": draw(settlements),
        "chargeback": draw((st.none() | chargebacks) if timeable else chargebacks),
        "payment": payment,
        "funded_amount": funded,
        "released_amount": draw(st.integers(min_value=0, max_value=funded)),
        "refunded_amount": 0,
    }
    return base.model_copy(update=update)


rules = st.builds(
    DomainSettings,
    feature_auto_refund=st.booleans(),
    delivered_timeout_action=st.sampled_from(["refund", "release"]),
)


@st.composite
def around(draw: st.DrawFn, deadline: datetime | None) -> datetime:
    """A time anywhere, or right at / next to `deadline` (where off-by-one errors live)."""
    if deadline is None or draw(st.booleans()):
        return draw(moments)
    step = draw(st.sampled_from([0, 1, -1, 1_000_000, -1_000_000]))
    return deadline + timedelta(microseconds=step)


# --- the oracle: SPEC §2 "Timeouts" and §10 holding limits, written from the text ---------


def spec_timeout(escrow: Escrow, now: datetime, settings_: DomainSettings) -> str | None:
    """The timeout command type due, or None: AWAIT_FUNDS at or past expiresAt; DELIVERED at
    or past autoRefundAt with auto-refund on and no release approved; never while a
    settlement is pending or a chargeback is open."""
    chargeback_open = (
        escrow.chargeback is not None and escrow.chargeback.status == ChargebackStatus.OPEN
    )
    if escrow.settlement is not None or chargeback_open:
        return None
    if escrow.status == EscrowStatus.AWAIT_FUNDS and now >= escrow.expires_at:
        return "CancelEscrow"
    if (
        escrow.status == EscrowStatus.DELIVERED
        and settings_.feature_auto_refund
        and escrow.auto_refund_at is not None
        and now >= escrow.auto_refund_at
        and escrow.release_approved_at is None
    ):
        return "ReleaseFunds" if settings_.delivered_timeout_action == "release" else "RefundEscrow"
    return None


def spec_holds_past(escrow: Escrow, now: datetime, warn_days: int) -> bool:
    """A STRIPE escrow, not ended, still holding money, funded more than `warn_days` ago."""
    held = escrow.funded_amount - escrow.released_amount - escrow.refunded_amount
    funded_at = escrow.payment.funded_at if escrow.payment is not None else None
    return (
        escrow.rail == Rail.STRIPE
        and escrow.status in ("AWAIT_FUNDS", "FUNDS_HELD", "DELIVERED", "DISPUTED")
        and held > 0
        and funded_at is not None
        and now - funded_at > timedelta(days=warn_days)
    )


@settings(max_examples=400, deadline=None)
@given(escrow=escrows(), settings_=rules, data=st.data())
def test_a_timeout_is_due_exactly_from_the_timeout_deadline(
    escrow: Escrow, settings_: DomainSettings, data: st.DataObject
) -> None:
    deadline = timeout_deadline(escrow, settings_)
    now = data.draw(around(deadline))
    expected = spec_timeout(escrow, now, settings_)
    assert (deadline is not None and deadline <= now) == (expected is not None)
    command = timeout_command_for(escrow, now, settings_)
    assert (command.type if command is not None else None) == expected
    due = due_timeouts([escrow_table.dump(escrow)], now, settings_)
    assert [c.type for c in due] == ([expected] if expected else [])


@settings(max_examples=400, deadline=None)
@given(escrow=escrows(), warn_days=st.integers(min_value=1, max_value=120), data=st.data())
def test_a_hold_counts_past_the_warning_exactly_after_its_time(
    escrow: Escrow, warn_days: int, data: st.DataObject
) -> None:
    after = hold_warning_after(escrow, warn_days)
    now = data.draw(around(after))
    expected = spec_holds_past(escrow, now, warn_days)
    assert (after is not None and now > after) == expected
    assert holds_card_funds_past(escrow, now, warn_days) == expected


@settings(max_examples=200, deadline=None)
@given(escrow=escrows(), settings_=rules, warn_days=st.none() | st.integers(1, 120))
def test_deadlines_of_are_both_deadlines(
    escrow: Escrow, settings_: DomainSettings, warn_days: int | None
) -> None:
    expected = Deadlines(
        timeout_deadline(escrow, settings_),
        None if warn_days is None else hold_warning_after(escrow, warn_days),
    )
    assert deadlines_of(escrow, settings_, warn_days) == expected


def test_the_deadlines_of_real_escrows() -> None:
    rules_ = DomainSettings()
    awaiting, held, delivered, released = (
        TEMPLATES[0],
        TEMPLATES[2],
        TEMPLATES[4],
        TEMPLATES[7],
    )
    assert timeout_deadline(awaiting, rules_) == awaiting.expires_at
    assert timeout_deadline(delivered, rules_) == delivered.auto_refund_at
    assert timeout_deadline(held, rules_) is None
    off = DomainSettings(feature_auto_refund=False)
    assert timeout_deadline(delivered, off) is None  # nothing would ever act on it
    assert timeout_deadline(TEMPLATES[5], rules_) is None  # a settlement is pending
    funded_at = held.payment.funded_at  # type: ignore[union-attr]
    assert funded_at is not None
    assert hold_warning_after(held, 80) == funded_at + days(80)
    assert deadlines_of(released, rules_, 80) == NO_DEADLINES
    assert deadlines_of(awaiting, rules_, 80) == Deadlines(awaiting.expires_at, None)
