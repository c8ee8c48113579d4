"""Shared pydantic base models and bounded string types of the escrow domain."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

#: Validation context marking data that arrived as JSON (amounts must then be strings).
WIRE_CONTEXT: dict[str, Any] = {"wire": True}

ID_LENGTH_MAX = 200
SHORT_TEXT_LENGTH_MAX = 200
TEXT_LENGTH_MAX = 2000
EVIDENCE_KEYS_MAX = 20
EVIDENCE_KEY_LENGTH_MAX = 512
MILESTONES_MAX = 50


class DomainModel(BaseModel):
    """Frozen, camelCase-aliased model that rejects unknown fields (commands, state)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
    )


class TolerantModel(BaseModel):
    """Frozen, camelCase-aliased model that ignores unknown fields (events read by others)."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        populate_by_name=True,
        alias_generator=to_camel,
    )


#: Tab and newline: the only C0 control characters free text may hold (SPEC §10).
FREE_TEXT_CONTROLS = frozenset("\t\n")


def no_control_characters(value: str, allowed: frozenset[str] = frozenset()) -> str:
    """Refuse NUL and the other C0 controls (and DEL): PostgreSQL cannot store NUL in text,
    and none of them belongs in an id, a reason or a note."""
    for index, char in enumerate(value):
        if (char < " " or char == "\x7f") and char not in allowed:
            raise ValueError(f"control character U+{ord(char):04X} at position {index}")
    return value


def fitted(value: str, length_max: int = TEXT_LENGTH_MAX) -> str:
    """Outside words (a provider's error message or code) made to fit a text field: C0
    controls other than tab and newline become spaces, and at most ``length_max``
    characters are kept (``SHORT_TEXT_LENGTH_MAX`` for codes and reasons)."""
    cleaned = "".join(
        " " if (c < " " or c == "\x7f") and c not in FREE_TEXT_CONTROLS else c for c in value
    )
    return cleaned[:length_max]


def _free_text(value: str) -> str:
    return no_control_characters(value, FREE_TEXT_CONTROLS)


#: An identifier: 1..200 printable ASCII characters without spaces.
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_LENGTH_MAX, pattern=r"^[!-~]+$")]
#: A short free text such as a reason or an error code.
ShortText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=SHORT_TEXT_LENGTH_MAX, strip_whitespace=False),
    AfterValidator(_free_text),
]
#: A longer free text such as a note or an error message.
Text = Annotated[str, StringConstraints(max_length=TEXT_LENGTH_MAX), AfterValidator(_free_text)]
EvidenceKey = Annotated[
    str,
    StringConstraints(min_length=1, max_length=EVIDENCE_KEY_LENGTH_MAX),
    AfterValidator(no_control_characters),
]
EvidenceKeys = Annotated[tuple[EvidenceKey, ...], Field(max_length=EVIDENCE_KEYS_MAX)]
Timestamp = AwareDatetime
