"""Command and event envelopes (SPEC §3): build, encode, sign, headers, topic handles.

Every part of the service that issues a command (the gateway, the webhooks, the payments and
unmatched-funds agents, the screening loops, the timeout processor) builds it with
:func:`make_command` and puts it on the wire as :func:`encode_command` makes it — the bytes a
system command's HMAC signs (:func:`signed_headers`).  The processor writes events with
:func:`encode_event` and :func:`event_headers`.  :class:`Topics` are the raw-bytes handles of
the four topics the processor reads and writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import faust

from escrow_stream.config import Settings
from escrow_stream.domain import ActorRole, Command, Event, parse_command
from escrow_stream.signing import signature_headers

Headers = list[tuple[str, bytes]]


def make_command(
    actor: Mapping[str, str],
    type_: str,
    escrow_id: str,
    payload: Mapping[str, Any],
    command_id: str,
    issued_at: datetime,
    causation_id: str | None = None,
    correlation_id: str | None = None,
) -> Command:
    """A command this service itself issues, validated like any other; raises
    ``CommandInvalid``."""
    return parse_command(
        {
            "schemaVersion": 1,
            "commandId": command_id,
            "type": type_,
            "escrowId": escrow_id,
            "actor": dict(actor),
            "payload": dict(payload),
            "issuedAt": issued_at.isoformat(),
            "causationId": causation_id,
            "correlationId": correlation_id or command_id,
        }
    )


def encode_command(command: Command) -> bytes:
    """A command as producers put it on ``escrow-commands`` (what the HMAC signs)."""
    return command.model_dump_json(by_alias=True, exclude_none=True).encode()


def signed_headers(command: Command, body: bytes, secret: str) -> Headers:
    """The Kafka headers of ``body``: the HMAC of a system command (SPEC §3, Trust); none
    for other roles, which the producing service asserts."""
    if command.actor.role is ActorRole.SYSTEM:
        return signature_headers(secret, body)
    return []


#: Snapshot fields that stay in the escrow's table and are never published: the commands the
#: escrow remembers for deduplication (with their events) are the processor's own memory, not
#: part of the snapshot SPEC §2 lists, and they would make every event grow with the escrow's
#: history.
UNPUBLISHED_SNAPSHOT_FIELDS = frozenset({"recent_commands"})


def encode_event(event: Event) -> bytes:
    """The event as published on ``escrow.events.v1``: its snapshot without
    :data:`UNPUBLISHED_SNAPSHOT_FIELDS`."""
    return event.model_dump_json(
        by_alias=True, exclude={"escrow": set(UNPUBLISHED_SNAPSHOT_FIELDS)}
    ).encode()


def event_headers(event: Event) -> Headers:
    return [
        ("x-event-id", str(event.event_id).encode()),
        ("x-event-type", event.type.encode()),
        ("x-escrow-version", str(event.version).encode()),
    ]


class Topics:
    """The topics the processor reads and writes, as raw bytes."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.commands = app.topic(settings.kafka_commands_topic, **raw)
        self.events = app.topic(settings.kafka_events_topic, **raw)
        self.rejections = app.topic(settings.kafka_rejections_topic, **raw)
        self.dlq = app.topic(settings.kafka_dlq_topic, **raw)
