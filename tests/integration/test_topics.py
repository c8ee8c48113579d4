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
