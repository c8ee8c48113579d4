"""Shared fixtures: settings for the local stack, and the topics a session leaves behind."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from escrow_stream.config import Settings, load_settings
from escrow_stream.db import migrate
from escrow_stream.kafka import client_kwargs
from tests.harness import SESSION_TAG, reachable, stack_environ

#: The topics of this session's test deployments (``Stack.create``: ``t-{tag}{hex}.…``, and
#: Faust's internal and changelog topics of its group ``escrow-t-{tag}{hex}``).
SESSION_TOPIC = re.compile(rf"^(escrow-)?t-{SESSION_TAG}[0-9a-f]{{6}}[.-]")
DELETE_BATCH = 100


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    """Settings pointing at the local stack; fails loudly when the stack is not up."""
    settings = load_settings(stack_environ())
    if not _broker_reachable(settings):
        pytest.fail(
            f"Kafka is not reachable at {settings.kafka_brokers}: run `make stack-up` "
            "(or `make test`, which brings the stack up)"
        )
    # The schema the workers under test write to: migrated once per session (idempotent).
    migrate.upgrade(settings)
    yield settings


@pytest.fixture(scope="session", autouse=True)
def delete_session_topics() -> Iterator[None]:
    """Every test deployment makes its own topics; a broker that kept them all, session
    after session, runs out of file handles.  At the end, delete what this session made
    (with no broker at the start, as for the unit tests alone, there is nothing to do).
    Only this session's topics (``SESSION_TAG``): another pytest run on the same broker
    keeps its own."""
    settings = load_settings(stack_environ())
    if not _broker_reachable(settings):
        yield
        return
    before = asyncio.run(_topics(settings))
    yield
    if _broker_reachable(settings):
        made = {t for t in asyncio.run(_topics(settings)) - before if SESSION_TOPIC.match(t)}
        if made:
            asyncio.run(_delete(settings, made))


def _broker_reachable(settings: Settings) -> bool:
    host, _, port = settings.bootstrap_servers[0].partition(":")
    return reachable(host, int(port or 9092))


async def _topics(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _delete(settings: Settings, names: set[str]) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        batch = sorted(names)
        for start in range(0, len(batch), DELETE_BATCH):
            await admin.delete_topics(batch[start : start + DELETE_BATCH])
    finally:
        await admin.close()
