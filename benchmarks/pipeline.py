"""End-to-end pipeline benchmark on the local broker: commands produced → events readable.

Run with the local stack up (``make stack-up``): ``python -m benchmarks.pipeline``.

1. Baseline: aiokafka alone produces the same number of same-sized messages to a fresh
   topic and a consumer reads them back — the broker's raw throughput on this machine.
2. Pipeline: one ``escrow-stream worker`` process; a producer sends whole escrow
   lifecycles (create, instructions, funds, deliver, release, settlement confirmed) while
   a consumer on the events topic timestamps every event by its causationId.
3. Prints sustained commands/s, p50/p99 latency (send → event read) and the ratio of the
   pipeline's rate to the baseline's, both measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from escrow_stream.kafka import client_kwargs, topic_partitions
from escrow_stream.topics import TopicSpec, create_topics
from tests.builders import wire_command
from tests.harness import Stack, unique

BUYER = {"id": "bench-buyer", "role": "user"}
SELLER = {"id": "bench-seller", "role": "user"}
SYSTEM = {"id": "payments-agent", "role": "system"}
AMOUNT = 10_000


def lifecycle(escrow_id: str) -> list[dict[str, Any]]:
    create = {
        "offerId": "o",
        "contractId": "c",
        "buyerId": BUYER["id"],
        "sellerId": SELLER["id"],
        "rail": "STRIPE",
        "amount": str(AMOUNT),
        "currency": "USD",
    }
    return [
        wire_command("CreateEscrow", escrow_id, BUYER, create),
        wire_command(
            "RecordPaymentInstructions",
            escrow_id,
            SYSTEM,
            {"provider": "stripe", "providerPaymentId": f"pi_{escrow_id}"},
        ),
        wire_command(
            "ConfirmFunds",
            escrow_id,
            SYSTEM,
            {
                "provider": "stripe",
                "providerPaymentId": f"pi_{escrow_id}",
                "amount": str(AMOUNT),
                "currency": "USD",
            },
        ),
        wire_command("MarkDelivered", escrow_id, SELLER),
        wire_command("ReleaseFunds", escrow_id, BUYER),
        wire_command(
            "ConfirmSettlement",
            escrow_id,
            SYSTEM,
            {
                "settlementId": f"escrow-release:{escrow_id}:all:1",
                "provider": "stripe",
                "providerReference": f"tr_{escrow_id}",
                "amount": str(AMOUNT),
            },
        ),
    ]


async def read_all(stack: Stack, topic: str, expected: int, timeout_s: float) -> dict[str, float]:
    """Read ``topic`` until ``expected`` distinct keys-of-interest arrived; id → arrival time."""
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_kwargs(stack.settings))
    await consumer.start()
    seen: dict[str, float] = {}
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(stack.settings, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while len(seen) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            now = time.perf_counter()
            for records in batches.values():
                for r in records:
                    data = json.loads(r.value)
                    seen.setdefault(data.get("causationId") or data["commandId"], now)
        return seen
    finally:
        await consumer.stop()


async def produce(
    stack: Stack, topic: str, records: list[tuple[bytes, bytes, list[Any]]]
) -> dict[bytes, float]:
    producer = AIOKafkaProducer(acks="all", linger_ms=5, **client_kwargs(stack.settings))
    await producer.start()
    sent: dict[bytes, float] = {}
    try:
        futures = []
        for key, value, headers in records:
            sent[value] = time.perf_counter()
            futures.append(await producer.send(topic, value=value, key=key, headers=headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


async def baseline(stack: Stack, records: list[tuple[bytes, bytes, list[Any]]]) -> float:
    topic = unique("bench-raw")
    await create_topics(stack.settings, [TopicSpec(topic, 6, 1)])
    started = time.perf_counter()
    reader = asyncio.create_task(read_all(stack, topic, len(records), 120))
    await produce(stack, topic, records)
    seen = await reader
    elapsed = time.perf_counter() - started
    assert len(seen) == len(records), f"baseline read {len(seen)} of {len(records)}"
    return len(records) / elapsed


async def pipeline(stack: Stack, commands: list[dict[str, Any]]) -> tuple[float, list[float]]:
    from escrow_stream.signing import signature_headers

    records = []
    for c in commands:
        value = json.dumps(c).encode()
        headers = signature_headers(stack.secret(), value) if c["actor"]["role"] == "system" else []
        records.append((c["escrowId"].encode(), value, headers))
    started = time.perf_counter()
    reader = asyncio.create_task(
        read_all(stack, stack.settings.kafka_events_topic, len(commands), 300)
    )
    sent = await produce(stack, stack.settings.kafka_commands_topic, records)
    seen = await reader
    elapsed = max(seen.values()) - started
    assert len(seen) == len(commands), f"pipeline produced {len(seen)} of {len(commands)} events"
    by_id = {json.loads(v)["commandId"]: t for v, t in sent.items()}
    latencies = [seen[cid] - by_id[cid] for cid in by_id]
    return len(commands) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--escrows", type=int, default=500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack.create(Path(tmp))
        asyncio.run(stack.create_topics())
        commands = [c for i in range(args.escrows) for c in lifecycle(unique("bench"))]
        # interleave the lifecycles: every escrow is in flight at once
        per = len(lifecycle("x"))
        commands = [commands[e * per + k] for k in range(per) for e in range(args.escrows)]
        raw = [(c["escrowId"].encode(), json.dumps(c).encode(), []) for c in commands]
        raw_rate = asyncio.run(baseline(stack, raw))

        worker = stack.worker("bench").start()
        try:
            worker.wait_healthy()
            rate, latencies = asyncio.run(pipeline(stack, commands))
        finally:
            worker.stop()

    quantiles = statistics.quantiles(latencies, n=100)
    print(f"commands                         {len(commands)} ({args.escrows} escrows)")
    print(f"raw broker produce+consume msg/s {raw_rate:,.0f}")
    print(f"pipeline commands/s end to end   {rate:,.0f}")
    print(f"pipeline / raw                   {rate / raw_rate:.3f}")
    print(f"latency p50 ms                   {quantiles[49] * 1000:.1f}")
    print(f"latency p99 ms                   {quantiles[98] * 1000:.1f}")


if __name__ == "__main__":
    main()
