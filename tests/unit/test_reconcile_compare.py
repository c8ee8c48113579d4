"""The provider reconciliation's comparison (``domain/reconcile.py``): records in, differences
out, no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from escrow_stream.domain.reconcile import (
    CUSTODIAN,
    STRIPE,
    FundedEscrow,
    LedgerSettlement,
    Obj,
    OurDeposit,
    OurRecords,
    ProviderObject,
    SettlementEffect,
    UnmatchedFunds,
    compare,
)

SINCE = datetime(2026, 11, 23, tzinfo=UTC)
T = SINCE + timedelta(days=3)
RELEASE = "escrow-release:esc-1:all:1"
REFUND = "escrow-refund:esc-2:all:1"
USDC_RELEASE = "escrow-release:esc-3:all:1"


def intent(
    object_id: str, escrow_id: str | None, amount: int, status: str = "succeeded"
) -> ProviderObject:
    return ProviderObject(
        STRIPE, Obj.PAYMENT_INTENT, object_id, amount, "USD", status, T, escrow_id=escrow_id
    )


def clean_world() -> tuple[OurRecords, list[ProviderObject]]:
    """esc-1: Stripe, funded and released; esc-2: Stripe, refunded; esc-3: USDC, released;
    one unmatched Stripe payment returned; one unmatched USDC deposit returned."""
    ours = OurRecords(
        escrows=(
            FundedEscrow("esc-1", STRIPE, T, "pi_1", "pi_1", 10_000),
            FundedEscrow("esc-2", STRIPE, T, "pi_2", "pi_2", 5_000),
            FundedEscrow("esc-3", CUSTODIAN, T, "da_3", "dpt_3", 7_000_000),
        ),
        settlements=(
            SettlementEffect(RELEASE, "esc-1", STRIPE, "RELEASE", "SUCCEEDED", "tr_1", 9_500, T),
            SettlementEffect(REFUND, "esc-2", STRIPE, "REFUND", "SUCCEEDED", "re_2", 5_000, T),
            SettlementEffect(
                USDC_RELEASE, "esc-3", CUSTODIAN, "RELEASE", "SUCCEEDED", None, 6_650_000, T
            ),
        ),
        ledger=(
            LedgerSettlement("ev-1", "esc-1", "EscrowReleased", STRIPE, "tr_1", 9_500, T),
            LedgerSettlement("ev-2", "esc-2", "EscrowRefunded", STRIPE, "re_2", 5_000, T),
            LedgerSettlement("ev-3", "esc-3", "EscrowReleased", CUSTODIAN, "ctx_3", 6_650_000, T),
        ),
        deposits=(OurDeposit("dpt_3", "esc-3", 7_000_000, "CLEARED", T),),
        unmatched=(
            UnmatchedFunds("uf-1", STRIPE, "pi_9", "esc-9", 2_000, "RETURNED", "re_9", T),
            UnmatchedFunds("uf-2", CUSTODIAN, "dpt_8", "esc-3", 1_000, "RETURNED", None, T),
        ),
    )
    theirs = [
        intent("pi_1", "esc-1", 10_000),
        intent("pi_2", "esc-2", 5_000),
        intent("pi_9", "esc-9", 2_000),
        ProviderObject(
            STRIPE, Obj.TRANSFER, "tr_1", 9_500, "USD", "paid", T, "esc-1", settlement_id=RELEASE
        ),
        ProviderObject(
            STRIPE, Obj.REFUND, "re_2", 5_000, "USD", "succeeded", T, "esc-2", settlement_id=REFUND
        ),
        ProviderObject(
            STRIPE,
            Obj.REFUND,
            "re_9",
            2_000,
            "USD",
            "succeeded",
            T,
            "esc-9",
            unmatched_funds_id="uf-1",
            payment_intent="pi_9",
        ),
        ProviderObject(CUSTODIAN, Obj.DEPOSIT, "dpt_3", 7_000_000, "USDC", "CONFIRMED", T, "esc-3"),
        ProviderObject(CUSTODIAN, Obj.DEPOSIT, "dpt_8", 1_000, "USDC", "CONFIRMED", T, "esc-3"),
        ProviderObject(
            CUSTODIAN,
            Obj.TRANSFER,
            "ctx_3",
            6_650_000,
            "USDC",
            "COMPLETED",
            T,
            "esc-3",
            settlement_id=USDC_RELEASE,
        ),
        ProviderObject(
            CUSTODIAN,
            Obj.TRANSFER,
            "ctx_8",
            1_000,
            "USDC",
            "COMPLETED",
            T,
            "esc-3",
            unmatched_funds_id="uf-2",
        ),
        # not ours: no metadata of ours (another product on the same Stripe account)
        intent("pi_other", None, 123),
        # unpaid PaymentIntents moved no money
        intent("pi_unpaid", "esc-unknown", 50, status="requires_payment_method"),
    ]
    return ours, theirs


def kinds(differences: list) -> list[tuple[str, str, str | None, str | None]]:  # type: ignore[type-arg]
    return [(d.kind.value, d.object.value, d.object_id, d.escrow_id) for d in differences]


def test_a_clean_world_has_no_difference() -> None:
    ours, theirs = clean_world()
    assert compare(ours, theirs, SINCE) == []


def test_a_paid_intent_with_our_metadata_and_no_record_is_missing_on_our_side() -> None:
    ours, theirs = clean_world()
    found = compare(ours, [*theirs, intent("pi_x", "esc-nobody", 777)], SINCE)
    assert kinds(found) == [("missing_on_our_side", "payment_intent", "pi_x", "esc-nobody")]
    assert found[0].theirs == {"amount": 777, "currency": "USD", "status": "succeeded"}
    assert found[0].as_json()["objectId"] == "pi_x"


def test_a_funding_intent_the_provider_lacks_is_missing_at_provider() -> None:
    ours, theirs = clean_world()
    found = compare(ours, [o for o in theirs if o.object_id != "pi_1"], SINCE)
    assert kinds(found) == [("missing_at_provider", "payment_intent", "pi_1", "esc-1")]
    assert found[0].ours == {"record": "escrow funded", "amount": 10_000}


def test_amounts_that_disagree_are_reported_once_per_object() -> None:
    ours, theirs = clean_world()
    changed = [
        ProviderObject(
            STRIPE, Obj.TRANSFER, "tr_1", 9_499, "USD", "paid", T, "esc-1", settlement_id=RELEASE
        )
        if o.object_id == "tr_1"
        else o
        for o in theirs
    ]
    found = compare(ours, changed, SINCE)
    # the effect, the ledger and the provider side all see it: one line
    assert kinds(found) == [("amount_differs", "transfer", "tr_1", "esc-1")]
    assert found[0].ours is not None and found[0].ours["amount"] == 9_500


def test_a_transfer_of_ours_with_no_effect_or_return_is_missing_on_our_side() -> None:
    ours, theirs = clean_world()
    stray = ProviderObject(
        STRIPE, Obj.TRANSFER, "tr_stray", 100, "USD", "paid", T, "esc-1", settlement_id="x"
    )
    assert kinds(compare(ours, [*theirs, stray], SINCE)) == [
        ("missing_on_our_side", "transfer", "tr_stray", "esc-1")
    ]


def test_a_custodian_settlement_is_matched_by_its_reference_and_its_loss_reported() -> None:
    ours, theirs = clean_world()
    found = compare(ours, [o for o in theirs if o.object_id != "ctx_3"], SINCE)
    assert kinds(found) == [
        ("missing_at_provider", "transfer", None, "esc-3"),  # the effect's settlement id
        ("missing_at_provider", "transfer", "ctx_3", "esc-3"),  # the ledger's reference
    ]
    assert found[0].ours is not None and found[0].ours["settlementId"] == USDC_RELEASE


def test_custodian_deposits_both_ways() -> None:
    ours, theirs = clean_world()
    stray = ProviderObject(CUSTODIAN, Obj.DEPOSIT, "dpt_s", 5, "USDC", "CONFIRMED", T, "esc-3")
    pending = ProviderObject(CUSTODIAN, Obj.DEPOSIT, "dpt_p", 5, "USDC", "PENDING", T, "esc-3")
    found = compare(ours, [o for o in theirs if o.object_id != "dpt_8"] + [stray, pending], SINCE)
    assert sorted(kinds(found)) == [
        ("missing_at_provider", "deposit", "dpt_8", "esc-3"),  # the unmatched row's deposit
        ("missing_on_our_side", "deposit", "dpt_s", "esc-3"),
    ]


def test_another_deployments_escrows_and_funds_are_not_compared() -> None:
    ours, theirs = clean_world()
    others = [
        intent("pi_o", "esc-other", 1_000),
        ProviderObject(
            STRIPE, Obj.REFUND, "re_o", 5, "USD", "succeeded", T, None, unmatched_funds_id="uf-o"
        ),
    ]
    foreign = OurRecords(
        escrows=ours.escrows,
        settlements=ours.settlements,
        ledger=ours.ledger,
        deposits=ours.deposits,
        unmatched=ours.unmatched,
        foreign_escrows=frozenset({"esc-other"}),
        foreign_funds=frozenset({"uf-o"}),
    )
    assert compare(foreign, [*theirs, *others], SINCE) == []
    # unknown to the database altogether: reported
    assert len(compare(ours, [*theirs, *others], SINCE)) == 2


def test_the_window_bounds_both_directions() -> None:
    ours, theirs = clean_world()
    old = intent("pi_old", "esc-nobody", 5)
    old = ProviderObject(**{**old.__dict__, "created": SINCE - timedelta(seconds=1)})
    assert compare(ours, [*theirs, old], SINCE) == []
    # our records before the window are not looked for at the provider
    assert compare(ours, [o for o in theirs if o.object_id != "pi_1"], T + timedelta(days=1)) == []


def test_money_moved_for_a_failed_effect_is_a_status_difference() -> None:
    ours, theirs = clean_world()
    failed = OurRecords(
        escrows=ours.escrows,
        settlements=tuple(
            SettlementEffect(s.key, s.escrow_id, s.provider, s.kind, "FAILED", None, s.amount, T)
            if s.key == RELEASE
            else s
            for s in ours.settlements
        ),
        ledger=tuple(e for e in ours.ledger if e.reference != "tr_1"),
        deposits=ours.deposits,
        unmatched=ours.unmatched,
    )
    assert kinds(compare(failed, theirs, SINCE)) == [
        ("status_differs", "transfer", "tr_1", "esc-1")
    ]


def test_a_funded_escrow_whose_intent_is_not_succeeded_is_a_status_difference() -> None:
    ours, theirs = clean_world()
    unpaid = [
        intent("pi_1", "esc-1", 10_000, status="requires_payment_method")
        if o.object_id == "pi_1"
        else o
        for o in theirs
    ]
    assert kinds(compare(ours, unpaid, SINCE)) == [
        ("status_differs", "payment_intent", "pi_1", "esc-1")
    ]
