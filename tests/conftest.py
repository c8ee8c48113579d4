"""Shared fixtures: settings for the local stack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from escrow_stream.config import Settings, load_settings
from escrow_stream.db import migrate
from tests.harness import reachable, stack_environ


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    """Settings pointing at the local stack; fails loudly when the stack is not up."""
    settings = load_settings(stack_environ())
    host, _, port = settings.bootstrap_servers[0].partition(":")
    if not reachable(host, int(port or 9092)):
        pytest.fail(
            f"Kafka is not reachable at {settings.kafka_brokers}: run `make stack-up` "
            "(or `make test`, which brings the stack up)"
        )
    # The schema the workers under test write to: migrated once per session (idempotent).
    migrate.upgrade(settings)
    yield settings
