"""The custodian webhook's pure parts: signature window, deposit parsing, transfer mapping."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from escrow_stream.web.custodian_webhook import (
    custodian_command,
    custodian_deposit,
    custodian_signature,
    verify_custodian,
)
from escrow_stream.web.problems import Problem

SECRET = "whsec_unit_test_only"
BODY = b'{"id":"evt_1","type":"deposit.confirmed"}'
NOW = 1_800_000_000
SENDER = "0x" + "ab" * 20


def test_a_signature_inside_the_window_passes_both_ways() -> None:
    for stamp in (NOW, NOW - 300, NOW + 300):
        verify_custodian(
            SECRET, str(stamp), custodian_signature(SECRET, str(stamp), BODY), BODY, NOW
        )


@pytest.mark.parametrize(
    ("stamp", "signature", "body"),
    [
        (str(NOW - 301), None, BODY),  # stale
        (str(NOW + 301), None, BODY),  # from the future
        (str(NOW), "00" * 32, BODY),  # wrong signature
        (str(NOW), None, BODY + b" "),  # body changed after signing
        ("", None, BODY),  # no timestamp
        ("soon", None, BODY),  # not a number
    ],
)
def test_anything_else_is_refused(stamp: str, signature: str | None, body: bytes) -> None:
    signed = signature if signature is not None else custodian_signature(SECRET, stamp, BODY)
    with pytest.raises(Problem) as refused:
        verify_custodian(SECRET, stamp, signed, body, NOW)
    assert refused.value.status == 400


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(b"k", b"1.{}", hashlib.sha256).hexdigest()
    assert custodian_signature("k", "1", b"{}") == expected


def deposit_data(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": "dpt_1",
        "address": "0x" + "cd" * 20,
        "reference": "esc-1",
        "fromAddress": SENDER,
        "amount": "25000000",
        "asset": "usdc",
        "confirmations": 12,
        "txHash": "0x" + "ef" * 32,
    }
    data.update(overrides)
    return data


def test_a_deposit_is_parsed_with_integer_base_units() -> None:
    deposit = custodian_deposit(deposit_data())
    assert (deposit.escrow_id, deposit.amount, deposit.asset) == ("esc-1", 25_000_000, "USDC")
    assert deposit.sender_address == SENDER and deposit.confirmations == 12


@pytest.mark.parametrize(
    "overrides",
    [
        {"amount": "25.0"},
        {"amount": 25000000},
        {"amount": "0"},
        {"asset": "ETH"},
        {"fromAddress": "not-an-address"},
        {"reference": ""},
        {"id": None},
    ],
)
def test_malformed_deposits_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(Problem) as refused:
        custodian_deposit(deposit_data(**overrides))
    assert refused.value.status == 400


def test_transfer_events_become_commands_named_by_the_event() -> None:
    key = "escrow-release:esc-1:all:1"
    data = {
        "id": "tx_1",
        "reference": key,
        "amount": "24000000",
        "metadata": {"escrow_id": "esc-1"},
    }
    completed = {"id": "evt_1", "type": "transfer.completed", "data": data}
    assert custodian_command(completed) == (
        "ConfirmSettlement",
        "esc-1",
        {
            "settlementId": key,
            "provider": "custodian",
            "providerReference": "tx_1",
            "amount": "24000000",
        },
        "custodian:evt_1",
    )
    failed = custodian_command(
        {
            "id": "evt_2",
            "type": "transfer.failed",
            "data": {**data, "error": {"code": "insufficient_funds"}},
        }
    )
    assert failed is not None
    assert failed[0] == "RecordSettlementFailure" and failed[3] == "custodian:evt_2"
    assert failed[2]["errorCode"] == "insufficient_funds" and failed[2]["settlementId"] == key
    assert custodian_command({"type": "transfer.created", "data": data}) is None
    assert custodian_command({"type": "transfer.completed", "data": {"id": "tx_2"}}) is None
