"""Shared pydantic base models and bounded string types of the escrow domain."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticUndefined

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


M = TypeVar("M", bound=BaseModel)
_new = object.__new__
# the setters of BaseModel's four slots (faster than object.__setattr__ by name)
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__

#: Per model class: its fields in order with their defaults (required ones: undefined), the
#: field names, and the required field names.
_Layout = tuple[dict[str, Any], frozenset[str], frozenset[str]]
#: Defaults shared by every instance ``trusted`` builds (the domain's are all of these).
_IMMUTABLE_DEFAULTS = (type(None), type(PydanticUndefined), str, int, float, tuple, frozenset)
_LAYOUTS: dict[type[BaseModel], _Layout] = {}


def _layout(cls: type[BaseModel]) -> _Layout:
    layout = _LAYOUTS.get(cls)
    if layout is not None:
        return layout
    if cls.__private_attributes__ or cls.__pydantic_post_init__ or cls.__pydantic_root_model__:
        raise TypeError(f"{cls.__name__} needs pydantic's own construction")
    template: dict[str, Any] = {}
    for name, field in cls.__pydantic_fields__.items():
        if field.default_factory is not None:
            raise TypeError(f"{cls.__name__}.{name} has a default factory")
        default = field.default  # PydanticUndefined when required
        if not isinstance(default, _IMMUTABLE_DEFAULTS) and not (
            isinstance(default, BaseModel) and default.model_config.get("frozen")
        ):
            raise TypeError(f"{cls.__name__}.{name} has a mutable default")
        template[name] = default
    required = frozenset(n for n, v in template.items() if v is PydanticUndefined)
    layout = (template, frozenset(template), required)
    _LAYOUTS[cls] = layout
    return layout


def trusted(cls: type[M], /, **values: Any) -> M:
    """An instance of ``cls`` built from values that are valid already, without validating
    them again: what ``cls(**values)`` gives for valid values (the same field values in the
    same order, the same defaults and ``model_fields_set``), at less cost than validating
    them again or pydantic's ``model_construct`` (which is slower than validating for these
    small models).

    Only for values that passed the same or stricter constraints already: fields of a
    command, an event or a snapshot validated on the way in (``parse_command``,
    ``parse_event``, the table's load), or values derived from them that cannot leave the
    field's bounds.  Every boundary still validates.  An unknown or a missing required field
    name raises TypeError (a bug, not a business rule).
    """
    template, _, required = _LAYOUTS.get(cls) or _layout(cls)
    fields = {**template, **values}
    if len(fields) != len(template) or not required <= values.keys():
        raise TypeError(f"{cls.__name__}: unknown fields, or missing required ones, in {values}")
    model = _new(cls)
    _set_dict(model, fields)
    _set_fields_set(model, set(values))
    _set_extra(model, None)
    _set_private(model, None)
    return model


def replaced(model: M, update: Mapping[str, Any]) -> M:
    """``model.model_copy(update=update)`` for the frozen domain models (no validation, the
    updated fields added to ``model_fields_set``), faster, and refusing unknown names."""
    fields = {**model.__dict__, **update}
    if len(fields) != len(model.__dict__):
        raise TypeError(f"{type(model).__name__}: unknown fields in {sorted(update)}")
    copied = _new(type(model))
    _set_dict(copied, fields)
    _set_fields_set(copied, model.__pydantic_fields_set__ | update.keys())
    _set_extra(copied, None)
    _set_private(copied, None)
    return copied


#: Tab and newline: the only C0 control characters free text may hold (SPEC §10).
FREE_TEXT_CONTROLS = frozenset("\t\n")


@functools.cache
def _controls_but(allowed: frozenset[str]) -> re.Pattern[str]:
    """A pattern finding the first C0 control or DEL that is not in ``allowed``."""
    refused = [chr(c) for c in (*range(0x20), 0x7F) if chr(c) not in allowed]
    return re.compile("[" + "".join(re.escape(c) for c in refused) + "]")


def no_control_characters(value: str, allowed: frozenset[str] = frozenset()) -> str:
    """Refuse NUL and the other C0 controls (and DEL): PostgreSQL cannot store NUL in text,
    and none of them belongs in an id, a reason or a note."""
    found = _controls_but(allowed).search(value)
    if found is not None:
        index = found.start()
        raise ValueError(f"control character U+{ord(value[index]):04X} at position {index}")
    return value


def fits_text(value: str) -> bool:
    """True when ``value`` passes ``Text`` (at most ``TEXT_LENGTH_MAX`` characters, no C0
    control but tab and newline): a message built here may then skip validation."""
    return len(value) <= TEXT_LENGTH_MAX and _controls_but(FREE_TEXT_CONTROLS).search(value) is None


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
