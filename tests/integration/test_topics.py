"""Topics: creation is idempotent, verification passes, and catches a wrong topic."""

from __future__ import annotations

import pytest

from escrow_stream.config import Settings
from escrow_stream.topics import TopicSpec, create_topics, topic_specs, verify_topics
from tests.harness import unique

pytestmark = pytest.mark.integration


async def test_create_twice_then_verify(stack_settings: Settings) -> None:
    first = await create_topics(stack_settings)
    second = await create_topics(stack_settings)
    names = [s.name for s in topic_specs(stack_settings)]
    assert len(first) == len(names)
    assert second == [f"exists  {n}" for n in names]
    assert await verify_topics(stack_settings) == []


async def test_specs_follow_the_spec(stack_settings: Settings) -> None:
    by_name = {s.name: s for s in topic_specs(stack_settings)}
    assert by_name["escrow-commands"].partitions == 6
    assert by_name["escrow.events.v1"].partitions == 12
    assert by_name["escrow.events.v1"].configs["cleanup.policy"] == "compact"
    assert by_name["escrow.rejections.v1"].partitions == 6
    assert by_name["escrow-commands.dlq"].partitions == 6
    assert all(s.configs["retention.ms"] == "7776000000" for s in by_name.values())


async def test_verify_reports_a_wrong_partition_count(stack_settings: Settings) -> None:
    name = unique("wrong-partitions")
    actual = TopicSpec(name, 2, 1, {"cleanup.policy": "delete"})
    await create_topics(stack_settings, [actual])
    expected = TopicSpec(name, 6, 1, {"cleanup.policy": "compact"})
    problems = await verify_topics(stack_settings, [expected])
    assert f"{name}: partitions 2, expected 6" in problems
    assert f"{name}: cleanup.policy=delete, expected compact" in problems


async def test_verify_reports_a_missing_topic(stack_settings: Settings) -> None:
    name = unique("missing")
    assert await verify_topics(stack_settings, [TopicSpec(name, 1, 1)]) == [f"{name}: missing"]


async def test_a_replication_factor_above_the_broker_count_is_refused(
    stack_settings: Settings,
) -> None:
    """The stack has one broker: replication factor 3 stops ``topics create`` with a message
    saying why, a non-zero exit, and no topic created."""
    import asyncio
    import subprocess
    import sys

    from aiokafka.admin import AIOKafkaAdminClient

    from escrow_stream.kafka import client_kwargs
    from tests.harness import stack_environ

    run = unique("t")
    env = stack_environ(
        KAFKA_REPLICATION_FACTOR="3",
        KAFKA_COMMANDS_TOPIC=f"{run}.commands",
        KAFKA_EVENTS_TOPIC=f"{run}.events",
        KAFKA_REJECTIONS_TOPIC=f"{run}.rejections",
        KAFKA_DLQ_TOPIC=f"{run}.commands.dlq",
    )
    names = {env[k] for k in env if k.startswith("KAFKA_") and k.endswith("_TOPIC")}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "escrow_stream.cli", "topics", "create"],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "replication factor 3 is larger than the Kafka cluster's broker count (1)" in result.stderr
    ), result.stderr
    assert "no topics were created" in result.stderr
    assert "KAFKA_REPLICATION_FACTOR" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""

    admin = AIOKafkaAdminClient(**client_kwargs(stack_settings))
    await admin.start()
    try:
        assert names.isdisjoint(await admin.list_topics())
    finally:
        await admin.close()
