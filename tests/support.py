"""Helpers for tests that use the local stack: its environment, ports, unique names."""

from __future__ import annotations

import os
import socket
import uuid

#: The local stack (``make stack-up``); overridable for a stack elsewhere.
TEST_ENV_DEFAULTS = {
    "NODE_ENV": "test",
    "KAFKA_BROKERS": "127.0.0.1:9092",
    "DATABASE_URL": "postgresql://escrow:escrow@127.0.0.1:5432/escrow_test",
    "REDIS_URL": "redis://127.0.0.1:6379/15",
}


def stack_environ(**overrides: str) -> dict[str, str]:
    """The environment a test worker or client gets: the stack's, plus overrides."""
    env = dict(TEST_ENV_DEFAULTS)
    for key in TEST_ENV_DEFAULTS:
        if os.environ.get(f"TEST_{key}"):
            env[key] = os.environ[f"TEST_{key}"]
    env.update(overrides)
    return env


def production_env(**overrides: str) -> dict[str, str]:
    """A complete production environment whose secrets are unique, long enough and fake."""
    from escrow_stream.config import REQUIRED_IN_PRODUCTION

    env = {name: f"value-{name.lower()}-{'x' * 16}" for name in REQUIRED_IN_PRODUCTION}
    env.update(NODE_ENV="production", PORT="3000", JWT_SECRET="s" * 64)
    env.update(overrides)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
