"""JSON Schemas of the wire messages, generated from the pydantic models (the single source).

`json_schemas()` returns four documents keyed by file stem:

- ``command``: a command envelope as accepted on `escrow-commands` (validation mode);
- ``event``: an event as published on `escrow.events.v1` (serialization mode);
- ``rejection``: a rejection as published on `escrow.rejections.v1`;
- ``escrow``: the escrow snapshot carried in every event.
"""

from __future__ import annotations

from typing import Any

from .commands import COMMAND_ADAPTER
from .escrow import Escrow
from .events import EVENT_ADAPTER
from .rejections import Rejection

_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of command, event, rejection and escrow snapshot, by name."""
    documents: dict[str, dict[str, Any]] = {
        "command": COMMAND_ADAPTER.json_schema(by_alias=True, mode="validation"),
        "event": EVENT_ADAPTER.json_schema(by_alias=True, mode="serialization"),
        "rejection": Rejection.model_json_schema(by_alias=True, mode="serialization"),
        "escrow": Escrow.model_json_schema(by_alias=True, mode="serialization"),
    }
    for name, document in documents.items():
        document.setdefault("title", f"escrow-stream {name}")
        document["$schema"] = _DIALECT
    return documents
