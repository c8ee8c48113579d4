"""parse_command rejects malformed envelopes with field-level reasons."""

from __future__ import annotations

from typing import Any

import pytest
from domain_support import create_payload, envelope

from escrow_stream.domain import CommandInvalid, CreateEscrow, parse_command


def _create(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = envelope("CreateEscrow", "c1", "buyer", create_payload(**overrides))
    return data


def _fields(data: Any) -> list[str]:
    with pytest.raises(CommandInvalid) as caught:
        parse_command(data)
    assert str(caught.value).startswith("invalid command: ")
    assert all(set(e) == {"field", "message"} and e["message"] for e in caught.value.errors)
    return [e["field"] for e in caught.value.errors]


def test_a_valid_command_parses() -> None:
    assert isinstance(parse_command(_create()), CreateEscrow)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([1, 2], ""),
        ({"type": "StealFunds"}, "type"),
        ({"commandId": "x"}, "type"),
        ({**_create(), "type": 7}, "type"),
    ],
)
def test_unknown_or_missing_type(data: Any, field: str) -> None:
    assert _fields(data) == [field]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("commandId"), "commandId"),
        (lambda d: d.pop("escrowId"), "escrowId"),
        (lambda d: d.pop("actor"), "actor"),
        (lambda d: d.pop("issuedAt"), "issuedAt"),
        (lambda d: d.pop("payload"), "payload"),
        (lambda d: d.update(schemaVersion=2), "schemaVersion"),
        (lambda d: d.update(issuedAt="2025-01-01T12:00:00"), "issuedAt"),  # no offset
        (lambda d: d.update(issuedAt="yesterday"), "issuedAt"),
        (lambda d: d.update(commandId=""), "commandId"),
        (lambda d: d.update(commandId="has space"), "commandId"),
        (lambda d: d.update(commandId="x" * 201), "commandId"),
        (lambda d: d.update(actor={"id": "u", "role": "root"}), "actor.role"),
        (lambda d: d.update(actor={"id": "u"}), "actor.role"),
        (lambda d: d.update(extra="nope"), "extra"),
        (lambda d: d["payload"].update(amount="12.50"), "payload.amount"),
        (lambda d: d["payload"].update(amount="-5"), "payload.amount"),
        (lambda d: d["payload"].update(amount="1e3"), "payload.amount"),
        (lambda d: d["payload"].update(amount=10000), "payload.amount"),  # a JSON number
        (lambda d: d["payload"].update(amount=True), "payload.amount"),
        (lambda d: d["payload"].update(amount="0"), "payload.amount"),
        (lambda d: d["payload"].update(amount="1" * 31), "payload.amount"),
        (lambda d: d["payload"].update(amount="١٢"), "payload.amount"),  # non-ASCII digits
        (lambda d: d["payload"].update(rail="PAYPAL"), "payload.rail"),
        (lambda d: d["payload"].update(currency="EUR"), "payload.currency"),
        (lambda d: d["payload"].update(rail="USDC_BASE"), "payload.currency"),
        (lambda d: d["payload"].update(sellerId="buyer-1"), "payload.sellerId"),
        (lambda d: d["payload"].update(sellerFee="10001"), "payload.sellerFee"),  # > amount
        (lambda d: d["payload"].pop("offerId"), "payload.offerId"),
        (lambda d: d["payload"]["milestones"][1].update(amount="3999"), "payload.milestones"),
        (
            lambda d: d["payload"]["milestones"][1].update(milestoneId="m1"),
            "payload.milestones",
        ),
        (
            lambda d: d["payload"]["milestones"][0].update(amount="x"),
            "payload.milestones[0].amount",
        ),
        (lambda d: d["payload"]["milestones"][0].pop("title"), "payload.milestones[0].title"),
    ],
)
def test_create_escrow_field_errors(mutate: Any, field: str) -> None:
    data = _create()
    mutate(data)
    assert field in _fields(data)


@pytest.mark.parametrize(
    ("command_type", "payload", "field"),
    [
        (
            "ConfirmFunds",
            {"provider": "stripe", "providerPaymentId": "pi", "amount": "1"},
            "payload.currency",
        ),
        (
            "ConfirmFunds",
            {"provider": "paypal", "providerPaymentId": "pi", "amount": "1", "currency": "USD"},
            "payload.provider",
        ),
        ("CancelEscrow", {"reason": "BORED"}, "payload.reason"),
        ("ResolveDispute", {"resolution": "SPLIT", "reason": "x"}, "payload.resolution"),
        ("RaiseDispute", {"reason": ""}, "payload.reason"),
        ("RaiseDispute", {"reason": "x", "evidenceKeys": ["k"] * 21}, "payload.evidenceKeys"),
        ("RefundEscrow", {}, "payload.reason"),
        (
            "ConfirmSettlement",
            {"provider": "stripe", "providerReference": "tr", "amount": "-1"},
            "payload.amount",
        ),
        (
            "RecordSettlementFailure",
            {"errorCode": "e", "errorMessage": "m", "retryable": "maybe"},
            "payload.retryable",
        ),
        ("DeliverMilestone", {}, "payload.milestoneId"),
        ("MarkDelivered", {"note": "x" * 2001}, "payload.note"),
    ],
)
def test_other_payload_errors(command_type: str, payload: dict[str, Any], field: str) -> None:
    assert field in _fields(envelope(command_type, "c1", "system", payload))


def test_several_problems_are_all_reported_with_the_command_id() -> None:
    data = _create(amount="abc", rail="X")
    with pytest.raises(CommandInvalid) as caught:
        parse_command(data)
    fields = [e["field"] for e in caught.value.errors]
    assert {"payload.amount", "payload.rail"} <= set(fields)
    assert caught.value.command_id == "c1"
    assert caught.value.command_type == "CreateEscrow"


def test_outside_words_are_fitted_to_text_fields() -> None:
    from escrow_stream.domain import SHORT_TEXT_LENGTH_MAX, fitted

    assert fitted("card\x00declined\r\n\tbank") == "card declined \n\tbank"
    assert fitted("x" * 5000) == "x" * 2000
    assert fitted("c" * 300, SHORT_TEXT_LENGTH_MAX) == "c" * 200
