"""A JSON command keyed by escrowId goes through the real broker to its key's partition."""

from __future__ import annotations

import json
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from escrow_stream.config import Settings
from escrow_stream.kafka import client_kwargs
from escrow_stream.topics import COMMANDS_PARTITIONS, create_topics

pytestmark = pytest.mark.integration


def java_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2, positive), as every client must agree on."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


async def test_command_round_trip_on_the_keys_partition(stack_settings: Settings) -> None:
    await create_topics(stack_settings)
    topic = stack_settings.kafka_commands_topic
    escrow_id = str(uuid.uuid4())
    command = {
        "schemaVersion": 1,
        "commandId": str(uuid.uuid4()),
        "type": "CreateEscrow",
        "escrowId": escrow_id,
        "actor": {"id": "buyer-1", "role": "user"},
        "payload": {"amount": "10000", "currency": "USD"},
    }
    value = json.dumps(command).encode()
    key = escrow_id.encode()
    expected_partition = java_partition(key, COMMANDS_PARTITIONS)

    producer = AIOKafkaProducer(acks="all", **client_kwargs(stack_settings))
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()
    assert metadata.partition == expected_partition

    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_kwargs(stack_settings))
    await consumer.start()
    try:
        tp = TopicPartition(topic, expected_partition)
        consumer.assign([tp])
        consumer.seek(tp, metadata.offset)
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert record.partition == expected_partition
    assert record.key == key
    assert json.loads(record.value) == command
