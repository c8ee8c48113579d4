"""The shortcuts decide/evolve take since issue 13 give exactly what the validating code gave:
``trusted`` and ``replaced`` against pydantic's own construction, the control-character check
against the character loop it replaced, the canonical JSON of fingerprints against
``json.dumps``, and a derived value out of bounds is still refused by validation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from domain_support import Run, create_payload, envelope
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from escrow_stream.domain import Actor, Rejection, RejectionCode, decide, parse_command
from escrow_stream.domain._model import (
    FREE_TEXT_CONTROLS,
    Text,
    fits_text,
    no_control_characters,
    replaced,
    trusted,
)
from escrow_stream.domain.commands import _CANONICAL_JSON
from escrow_stream.domain.escrow import EventRecord, LedgerLine, Milestone, Payment
from escrow_stream.domain.event_data import EscrowFundsHeldData
from escrow_stream.domain.money import Currency, Provider

AT = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
ACTOR = Actor(id="payments-agent", role="system")

#: Valid field values of a few models, some optional fields given, some left to defaults.
CASES: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (LedgerLine, {"account": "escrow:esc-1:holding", "amount": -125_000}),
    (Milestone, {"milestone_id": "m1", "title": "Design", "amount": 6000}),
    (Payment, {"provider": Provider.STRIPE, "provider_payment_id": "pi_1"}),
    (
        EscrowFundsHeldData,
        {
            "provider": Provider.STRIPE,
            "provider_payment_id": "pi_1",
            "amount": 10_000,
            "currency": Currency.USD,
            "sender_address": None,
        },
    ),
    (
        EventRecord,
        {
            "event_id": "e-1",
            "type": "EscrowFundsHeld",
            "version": 3,
            "occurred_at": AT,
            "causation_id": "c-1",
            "correlation_id": "c-1",
            "actor": ACTOR,
            "data": {"amount": "10000"},
        },
    ),
    (
        Rejection,
        {
            "command_id": "c-1",
            "type": "ReleaseFunds",
            "escrow_id": "esc-1",
            "code": RejectionCode.INVALID_TRANSITION,
            "message": "ReleaseFunds is not allowed in status FUNDS_HELD",
            "rejected_at": AT,
            "trace_id": None,
        },
    ),
]


@pytest.mark.parametrize(("cls", "values"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_trusted_builds_what_validation_builds(
    cls: type[BaseModel], values: dict[str, Any]
) -> None:
    validated = cls(**values)
    built = trusted(cls, **values)
    assert type(built) is cls
    assert built == validated
    assert list(built.__dict__.items()) == list(validated.__dict__.items())  # field order
    assert built.model_fields_set == validated.model_fields_set
    assert built.model_dump_json(by_alias=True) == validated.model_dump_json(by_alias=True)
    assert built.model_dump_json(exclude_unset=True) == validated.model_dump_json(
        exclude_unset=True
    )
    assert repr(built) == repr(validated)
    assert built.__pydantic_extra__ is None and built.__pydantic_private__ is None


def test_trusted_refuses_unknown_and_missing_fields() -> None:
    with pytest.raises(TypeError, match="unknown fields"):
        trusted(LedgerLine, account="a", amount=1, acount="typo")
    with pytest.raises(TypeError, match="missing required"):
        trusted(LedgerLine, account="a")


@pytest.mark.parametrize(("cls", "values"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_replaced_is_model_copy_with_update(cls: type[BaseModel], values: dict[str, Any]) -> None:
    model = cls(**values)
    name = next(iter(values))
    update = {name: values[name]}
    want = model.model_copy(update=update)
    got = replaced(model, update)
    assert got == want and got is not model
    assert list(got.__dict__.items()) == list(want.__dict__.items())
    assert got.model_fields_set == want.model_fields_set
    with pytest.raises(TypeError, match="unknown fields"):
        replaced(model, {"no_such_field": 1})


def _controls_loop(value: str, allowed: frozenset[str]) -> str:
    """The character loop ``no_control_characters`` used before issue 13."""
    for index, char in enumerate(value):
        if (char < " " or char == "\x7f") and char not in allowed:
            raise ValueError(f"control character U+{ord(char):04X} at position {index}")
    return value


def _outcome(check: Any, value: str, allowed: frozenset[str]) -> str:
    try:
        return str(check(value, allowed))
    except ValueError as exc:
        return f"refused: {exc}"


TEXTS = st.text(alphabet=st.characters(max_codepoint=0x3000, exclude_categories=("Cs",)))
ALLOWED = st.sampled_from([frozenset(), FREE_TEXT_CONTROLS, frozenset("\r\x7f")])


@given(TEXTS, ALLOWED)
def test_the_control_character_check_refuses_what_the_loop_refused(
    value: str, allowed: frozenset[str]
) -> None:
    assert _outcome(no_control_characters, value, allowed) == _outcome(
        _controls_loop, value, allowed
    )


@given(st.one_of(TEXTS, st.text(max_size=2100).map(lambda s: s * 3)))
def test_fits_text_is_exactly_what_text_accepts(value: str) -> None:
    try:
        TypeAdapter(Text).validate_python(value)
        accepted = True
    except ValidationError:
        accepted = False
    assert fits_text(value) is accepted


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXTS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXTS, inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(TEXTS, JSON_VALUES, max_size=6))
def test_the_canonical_json_of_fingerprints_is_json_dumps(value: dict[str, Any]) -> None:
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert _CANONICAL_JSON(value) == expected


def test_a_settlement_id_too_long_for_an_id_is_still_refused_by_validation() -> None:
    """A 190-character escrowId makes ``escrow-release:{escrowId}:all:1`` longer than an id
    may be: the release is refused by validation (ValidationError), as before issue 13."""
    run = Run()
    long_id = "e" * 190

    def send(kind: str, role: str, payload: dict[str, Any] | None) -> Any:
        cmd = parse_command(envelope(kind, f"{kind}-1", role, payload, escrow_id=long_id))
        decision = decide(run.state, cmd, run.now, run.settings, run.context)
        assert decision.rejection is None, decision.rejection
        run.state = decision.state_after(run.state)
        return decision

    send("CreateEscrow", "buyer", create_payload(milestones=False))
    funds = {"provider": "stripe", "providerPaymentId": "pi_1", "amount": "10000"}
    send("ConfirmFunds", "system", {**funds, "currency": "USD"})
    send("MarkDelivered", "seller", {})
    with pytest.raises(ValidationError, match="settlement_id"):
        send("ReleaseFunds", "buyer", None)
