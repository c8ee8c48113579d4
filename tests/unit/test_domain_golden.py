"""decide+evolve output is byte-identical to the golden run recorded before issue 13's
speed-ups: events as published, rejections, fingerprints, table snapshots (golden_run.py
also folds every accepted step's events, read back from JSON, through ``evolve``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import golden_run
from hypothesis import given
from hypothesis import strategies as st

from escrow_stream.domain import EVENT_TYPES, event_id_for
from escrow_stream.domain.events import EVENT_ID_NAMESPACE

GOLDEN = Path(__file__).parent / "data" / "domain_golden.jsonl"


def _golden() -> list[str]:
    return GOLDEN.read_text(encoding="utf-8").splitlines()


def test_the_run_is_byte_identical_to_the_golden_file() -> None:
    expected = _golden()
    actual = golden_run.golden_text().splitlines()
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        if want != got:  # show the first differing step as a readable diff first
            assert json.loads(got) == json.loads(want)
            assert got == want


def test_the_golden_run_covers_every_event_type_rejections_and_duplicates() -> None:
    lines: list[dict[str, Any]] = [json.loads(line) for line in _golden()]
    seen = {e["type"] for line in lines for e in line.get("events", ())}
    codes = {line["rejection"]["code"] for line in lines if line.get("rejection")}
    assert seen == set(EVENT_TYPES)
    assert {"COMMAND_ID_REUSED", "NOT_AUTHORIZED", "INVALID_TRANSITION"} <= codes
    assert any(line.get("duplicate") for line in lines)


@given(st.text(min_size=1, max_size=200), st.integers(min_value=1, max_value=10**9))
def test_event_ids_are_the_uuid5_of_escrow_id_and_version(escrow_id: str, version: int) -> None:
    expected = str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{escrow_id}:{version}"))
    assert event_id_for(escrow_id, version) == expected
