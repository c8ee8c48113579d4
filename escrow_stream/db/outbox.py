"""The transactional outbox (SPEC §4): accepted commands wait in PostgreSQL until Kafka has them.

Writing (the gateway and the webhooks): :func:`enqueue` inserts the message inside the
caller's transaction, next to the idempotency record; nothing is sent before the commit.
Headers are stored losslessly (order, duplicates, bytes); a system command is signed by
the code that enqueues it (``signing.signature_headers`` over the payload) and the
publisher relays the signature as it is.

Relaying is :class:`escrow_stream.agents.relay.OutboxPublisher`; :func:`replay` makes
dead-lettered rows due again (``escrow-stream outbox replay``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from escrow_stream.domain import Command
from escrow_stream.messages import encode_command, signed_headers

Headers = Sequence[tuple[str, bytes]]


async def enqueue(
    conn: asyncpg.Connection,
    topic: str,
    key: str,
    payload: bytes,
    headers: Headers,
    aggregate_id: str,
) -> int:
    """Add a message to the outbox inside the caller's transaction; returns its row id."""
    row_id: int = await conn.fetchval(
        """
        INSERT INTO outbox (aggregate_id, topic, message_key, payload, headers)
        VALUES ($1, $2, $3, $4, $5) RETURNING id
        """,
        aggregate_id,
        topic,
        key,
        payload,
        encode_headers(headers),  # the pool's jsonb codec turns it into JSON
    )
    return row_id


async def enqueue_command(
    conn: asyncpg.Connection, topic: str, command: Command, secret: str
) -> int:
    """Add ``command`` to the outbox inside the caller's transaction, encoded and (a system
    command) signed as :mod:`escrow_stream.messages` says; keyed and grouped by its escrow."""
    body = encode_command(command)
    headers = signed_headers(command, body, secret)
    return await enqueue(conn, topic, command.escrow_id, body, headers, command.escrow_id)


def encode_headers(headers: Headers) -> list[dict[str, str]]:
    """Kafka headers as JSON: ``{"name", "value"}`` for text, ``{"name", "base64"}`` else."""
    encoded: list[dict[str, str]] = []
    for name, value in headers:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:  # jsonb cannot hold NUL
            encoded.append({"name": name, "base64": base64.b64encode(value).decode("ascii")})
        else:
            encoded.append({"name": name, "value": text})
    return encoded


def decode_headers(stored: Any) -> list[tuple[str, bytes]]:
    """The inverse of :func:`encode_headers`; also reads the older ``{name: text}`` form."""
    if isinstance(stored, str):
        stored = json.loads(stored)
    if isinstance(stored, dict):
        return [(name, str(value).encode("utf-8")) for name, value in stored.items()]
    decoded: list[tuple[str, bytes]] = []
    for item in stored or []:
        if "base64" in item:
            decoded.append((item["name"], base64.b64decode(item["base64"])))
        else:
            decoded.append((item["name"], item["value"].encode("utf-8")))
    return decoded


async def replay(
    pool: asyncpg.Pool,
    aggregate_ids: Sequence[str] | None,
    since: datetime | None,
    now: datetime | None = None,
) -> int:
    """The seed's "Outbox Replay": make matching rows due again; returns how many.

    With ``aggregate_ids`` and/or ``since``, published and dead-lettered rows of those
    aggregates / created since then are replayed.  With neither, only dead-lettered rows
    are: re-sending the whole published history needs an explicit filter (the processor
    remembers only each escrow's recent commandIds).  ``now`` (default: the database's
    clock) becomes ``next_attempt_at``.
    """
    everything = aggregate_ids is not None or since is not None
    status = await pool.execute(
        """
        UPDATE outbox
           SET published_at = NULL, dead_lettered_at = NULL, attempts = 0,
               next_attempt_at = coalesce($4::timestamptz, now()), last_error = NULL
         WHERE (dead_lettered_at IS NOT NULL OR ($3::boolean AND published_at IS NOT NULL))
           AND ($1::text[] IS NULL OR aggregate_id = ANY($1::text[]))
           AND ($2::timestamptz IS NULL OR created_at >= $2)
        """,
        list(aggregate_ids) if aggregate_ids is not None else None,
        since,
        everything,
        now,
    )
    return int(status.split()[-1])
