"""Servers and workers for the tests: the local stack's environment, ports and names, real
workers run against it, and talking to them only through Kafka.

Each :class:`Stack` gets its own topic names and consumer group, so tests never see
each other's commands or replay earlier runs' history.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from escrow_stream.config import LOCAL_S3, Settings, load_settings
from escrow_stream.kafka import client_kwargs, topic_partitions
from escrow_stream.signing import signature_headers
from escrow_stream.storage import EvidenceStore
from escrow_stream.topics import create_topics
from tests.builders import TEST_PAYOUTS

T = TypeVar("T")

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


def default_guarantee() -> str:
    """KAFKA_PROCESSING_GUARANTEE's default: what a fault test runs under unless
    CHAOS_PROCESSING_GUARANTEE names the other."""
    default: str = Settings.model_fields["kafka_processing_guarantee"].default
    return default


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


#: This pytest process's mark in the names of the topics its deployments make, so that the
#: clean-up at the end of a session deletes its own topics and never another session's.
SESSION_TAG = uuid.uuid4().hex[:4]


def deployment_name() -> str:
    """``t-`` + this session's tag + 6 random hex digits: the prefix of a test deployment's
    topics, consumer group and client id."""
    return f"t-{SESSION_TAG}{uuid.uuid4().hex[:6]}"


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


HEALTH_WAIT_S = 90.0
STOP_WAIT_S = 60.0
COLLECT_WAIT_S = 60.0


@dataclass
class Stack:
    """Topic names, group id and environment of one isolated test deployment."""

    env: dict[str, str]
    settings: Settings
    data_root: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    @classmethod
    def create(cls, data_root: Path, **overrides: str) -> Stack:
        run = deployment_name()
        defaults = {
            "KAFKA_GROUP_ID": f"escrow-{run}",
            "KAFKA_CLIENT_ID": f"escrow-{run}",
            "KAFKA_COMMANDS_TOPIC": f"{run}.commands",
            "KAFKA_EVENTS_TOPIC": f"{run}.events",
            "KAFKA_REJECTIONS_TOPIC": f"{run}.rejections",
            "KAFKA_DLQ_TOPIC": f"{run}.commands.dlq",
            "INTERNAL_COMMAND_SECRET": f"test-internal-secret-{run}",
            # the platform fee of escrows created without sellerFee: 500 of 10,000 cents
            "ESCROW_FEE_BPS": "500",
            # KYC gating is on (the seed's default) in the deployments that test what it
            # guards, verifying users through PUT /api/kyc: test_http_kyc, test_payouts,
            # test_payment_effects, test_chargebacks, test_two_hosts, test_smoke,
            # test_observability and test_processing's stream gate.  Off by default here,
            # for tests of other behaviour whose generated users never went through KYC.
            "FEATURE_KYC_GATING": "false",
            "WEB_HOST": "127.0.0.1",
            # the processor's tests play the payment provider themselves (system commands)
            "PAYMENTS_EFFECTS_ENABLED": "false",
            "STRIPE_API_BASE": "http://127.0.0.1:12111",
            # the stack's S3; each deployment its own bucket, made by ensure_bucket()
            "AWS_ENDPOINT_URL": os.environ.get("TEST_AWS_ENDPOINT_URL", LOCAL_S3),
            "AWS_S3_BUCKET": f"escrow-{run}",
            # every test request comes from 127.0.0.1: limits get a test of their own
            "RATE_LIMIT_PER_IP_PER_MINUTE": "1000000",
            "RATE_LIMIT_PER_USER_PER_MINUTE": "1000000",
        }
        env = stack_environ(**{**defaults, **overrides})
        return cls(env=env, settings=load_settings(env), data_root=data_root)

    async def create_topics(self) -> None:
        await create_topics(self.settings)

    def ensure_bucket(self) -> EvidenceStore:
        """Create this deployment's bucket in the stack's S3; the store to read it back."""
        store = EvidenceStore.from_settings(self.settings, lambda: uuid.uuid4().hex)
        store.ensure_bucket()
        return store

    def worker(self, name: str = "w1", **overrides: str) -> WorkerProcess:
        env = dict(self.env)
        env.update({"PORT": str(free_port()), "DATA_DIR": str(self.data_root / name)})
        env.update(overrides)
        worker = WorkerProcess(name, env, self.data_root / f"{name}.log")
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()

    # -- Kafka ----------------------------------------------------------------------

    def secret(self) -> str:
        return self.settings.internal_command_secret.get_secret_value()

    async def send(self, commands: list[dict[str, Any]], sign_system: bool = True) -> None:
        """Produce commands keyed by escrowId, signing system ones; acks=all, in order."""
        await self.send_raw(
            [
                (c["escrowId"].encode(), json.dumps(c).encode(), None if sign_system else [])
                for c in commands
            ]
        )

    async def send_raw(
        self, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]]
    ) -> None:
        """Produce raw records; headers None means "sign if the actor is system"."""
        producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            max_request_size=2_000_000,
            **client_kwargs(self.settings),
        )
        await producer.start()
        try:
            for key, value, headers in records:
                if headers is None:
                    headers = _sign_if_system(self.secret(), value)
                await producer.send_and_wait(
                    self.settings.kafka_commands_topic, value=value, key=key, headers=headers
                )
        finally:
            await producer.stop()

    async def read(
        self,
        topic: str,
        until: Callable[[list[Any]], bool],
        timeout_s: float = COLLECT_WAIT_S,
        isolation_level: str = "read_uncommitted",
    ) -> list[Any]:
        """Read ``topic`` from the beginning until ``until(records)`` or the timeout."""
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False,
            isolation_level=isolation_level,
            **client_kwargs(self.settings),
        )
        await consumer.start()
        records: list[Any] = []
        try:
            tps = [TopicPartition(topic, p) for p in await topic_partitions(self.settings, topic)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            deadline = time.monotonic() + timeout_s
            while not until(records) and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                for batch in batches.values():
                    records.extend(batch)
            return records
        finally:
            await consumer.stop()

    async def events(
        self, until: Callable[[list[dict[str, Any]]], bool], timeout_s: float = COLLECT_WAIT_S
    ) -> list[dict[str, Any]]:
        records = await self.read(
            self.settings.kafka_events_topic,
            lambda rs: until([json.loads(r.value) for r in rs]),
            timeout_s,
            isolation_level="read_committed",  # what the product's consumers see
        )
        return [json.loads(r.value) for r in records]

    async def rejections(
        self, until: Callable[[list[dict[str, Any]]], bool], timeout_s: float = COLLECT_WAIT_S
    ) -> list[dict[str, Any]]:
        records = await self.read(
            self.settings.kafka_rejections_topic,
            lambda rs: until([json.loads(r.value) for r in rs]),
            timeout_s,
            isolation_level="read_committed",  # what the product's consumers see
        )
        return [json.loads(r.value) for r in records]


def _sign_if_system(secret: str, value: bytes) -> list[tuple[str, bytes]]:
    try:
        role = json.loads(value).get("actor", {}).get("role")
    except (ValueError, AttributeError):
        return []
    return signature_headers(secret, value) if role == "system" else []


class WorkerProcess:
    """``escrow-stream worker`` as a child process, as an operator would run it."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = {**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.port = int(env["PORT"])
        self.host = env.get("WEB_HOST", "127.0.0.1")
        self.base_url = f"http://{self.host}:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "escrow_stream.cli", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def get(self, path: str, timeout_s: float = 5) -> tuple[int | None, dict[str, Any]]:
        """GET ``path`` on this worker: status and JSON body, error answers included;
        (None, {}) while nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.base_url}{path}", timeout=timeout_s) as r:
                return r.status, dict(json.loads(r.read()))
        except urllib.error.HTTPError as err:
            with err:
                try:
                    return err.code, dict(json.loads(err.read()))
                except ValueError:
                    return err.code, {}
        except OSError:
            return None, {}

    def health(self) -> dict[str, Any] | None:
        status, body = self.get("/health", timeout_s=2)
        return body if status == 200 else None

    def wait_healthy(self, timeout_s: float = HEALTH_WAIT_S) -> dict[str, Any]:
        return self._wait_for("/health to answer 200", self.health, timeout_s)

    def wait_processing(self, timeout_s: float = HEALTH_WAIT_S) -> None:
        """Until ``/ready`` says the processor has joined its group and recovered its tables
        (whatever the other components say: some tests run with one of them down)."""

        def processing() -> bool | None:
            checks = self.get("/ready")[1].get("checks", {})
            return True if checks.get("processor") == "ok" else None

        self._wait_for("the processor to be ready", processing, timeout_s)

    def _wait_for(self, what: str, answer: Callable[[], T | None], timeout_s: float) -> T:
        """Poll ``answer`` until it is not None, while the process lives (bounded)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            found = answer()
            if found is not None:
                return found
            time.sleep(0.3)
        raise AssertionError(f"{self.name}: no {what} within {timeout_s}s\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = STOP_WAIT_S) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def eventually(check: Callable[[], Any], timeout_s: float = COLLECT_WAIT_S) -> Any:
    """Poll an async or sync check until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.25)


#: The payout destinations :func:`activate_payouts` gives a seller by default.


async def activate_payouts(
    settings: Settings, user_id: str, destinations: dict[str, str] | None = None
) -> None:
    """Test set-up for Kafka-driven tests: ACTIVE payout accounts of ``user_id`` (rail →
    destination), as if Stripe or the wallet screening had activated them.  Tests of the
    onboarding itself go through ``/api/payout-accounts`` instead."""
    from escrow_stream.db import payouts
    from escrow_stream.db.pool import Database
    from escrow_stream.domain import Rail

    database = Database(settings)
    try:
        pool = await database.pool()
        for rail, destination in (destinations or TEST_PAYOUTS).items():
            await payouts.put(
                pool,
                user_id,
                Rail(rail),
                destination,
                payouts.PayoutStatus.ACTIVE,
                datetime.now(UTC),
                "test",
            )
    finally:
        await database.close()


async def mirrored_snapshots(settings: Settings, escrow_ids: list[str]) -> dict[str, Any]:
    """``escrows.snapshot`` by id from the PostgreSQL mirror."""
    import asyncpg

    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        rows = await conn.fetch(
            "SELECT id, snapshot::text AS snapshot FROM escrows WHERE id = ANY($1::text[])",
            escrow_ids,
        )
    finally:
        await conn.close()
    return {r["id"]: json.loads(r["snapshot"]) for r in rows}


async def drop_database(conn: Any, name: str) -> None:
    """Drop a scratch database, closing whatever is still connected (``FORCE``).  An
    autovacuum worker that just started on it is not ours to terminate (PostgreSQL refuses
    with InsufficientPrivilege): a plain DROP then cancels it itself, once our own
    connections are gone, so try that a few times."""
    import asyncpg

    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    except asyncpg.InsufficientPrivilegeError:
        pass
    for _ in range(10):
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            return
        except asyncpg.ObjectInUseError:
            await asyncio.sleep(0.5)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@asynccontextmanager
async def migrated_database(settings: Settings, prefix: str) -> AsyncIterator[Settings]:
    """A scratch database of its own, migrated to head, dropped afterwards: ``settings``
    pointing at it (no worker's relay or publisher sees its rows)."""
    import asyncpg
    from pydantic import SecretStr

    from escrow_stream.db import migrate

    admin_url = settings.database_url.get_secret_value()
    name = unique(prefix).replace("-", "_")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        url = admin_url.rsplit("/", 1)[0] + f"/{name}"
        scratch = settings.model_copy(update={"database_url": SecretStr(url)})
        await asyncio.to_thread(migrate.upgrade, scratch)
        yield scratch
    finally:
        await drop_database(conn, name)
        await conn.close()


def stripe_env(api_base: str, **overrides: str) -> dict[str, str]:
    """A deployment's environment for Stripe tests: payment effects on, Stripe at
    ``api_base`` (the fault proxy), a fresh webhook secret, quick retries that the test
    counts (no retry inside a round: ``ESCROW_MAX_RETRIES=0``, 50 ms doubling)."""
    env = {
        "PAYMENTS_EFFECTS_ENABLED": "true",
        "STRIPE_API_BASE": api_base,
        "STRIPE_WEBHOOK_SECRET": f"whsec_test_{uuid.uuid4().hex}",
        "ESCROW_RETRY_DELAY_MS": "50",
        "ESCROW_MAX_RETRIES": "0",
        "PROVIDER_TIMEOUT_MS": "1500",
    }
    env.update(overrides)
    return env


@contextmanager
def deployment(
    data_root: Path, name: str = "api", **overrides: str
) -> Iterator[tuple[Stack, WorkerProcess]]:
    """An isolated stack with one healthy worker; the worker must stop cleanly afterwards."""
    stack = Stack.create(data_root, **overrides)
    asyncio.run(stack.create_topics())
    worker = stack.worker(name).start()
    try:
        worker.wait_healthy()
        worker.wait_processing()
        yield stack, worker
    finally:
        code = worker.stop()
    assert code == 0, worker.log_tail()


# -- the stack's own servers --------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def stack_sh(*args: str) -> subprocess.CompletedProcess[str]:
    """``scripts/stack.sh`` as an operator runs it (the environment says which stack)."""
    return subprocess.run(
        [str(REPO / "scripts" / "stack.sh"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def require_ours(service: str) -> None:
    """Skip unless ``scripts/stack.sh`` started ``service`` (a system server is not ours to
    stop); CI's fresh machine always starts its own."""
    import pytest

    status = stack_sh("status", service)
    if " ours " not in f" {status.stdout} ":
        pytest.skip(f"{service} is not one scripts/stack.sh started: {status.stdout.strip()}")


@contextmanager
def stopped(service: str) -> Iterator[None]:
    """``service`` down for the body, and up again whatever happens."""
    down = stack_sh("down", service)
    assert down.returncode == 0, down.stderr
    try:
        yield
    finally:
        up = stack_sh("up", service)
        assert up.returncode == 0, up.stderr + up.stdout
