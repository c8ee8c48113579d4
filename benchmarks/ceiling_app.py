"""The ceiling of ``benchmarks.pipeline``: a bare Faust agent of the command processor's shape.

Per message: ``json.loads`` of the value, a RocksDB table get and set under the escrowId,
and one send to a 12-partition topic (the events topic's partition count); agent
concurrency 1 on a 6-partition source, the table co-partitioned with it, as the processor.
Plain ``faust.App`` with Faust's default settings (not the product's transport or
settings): what Faust itself allows on this machine and broker.

Started by the benchmark as its own worker process::

    CEILING_APP_ID=… CEILING_SOURCE=… CEILING_SINK=… CEILING_DATA_DIR=… \
    KAFKA_BROKERS=127.0.0.1:9092 python -m benchmarks.ceiling_app worker -l warning
"""

from __future__ import annotations

import json
import os
from typing import Any

import faust

app = faust.App(
    os.environ.get("CEILING_APP_ID", "bench-ceiling"),
    broker=[f"kafka://{b}" for b in os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092").split(",")],
    store="rocksdb://",
    datadir=os.environ.get("CEILING_DATA_DIR", "bench-ceiling-data"),
    topic_partitions=6,
    web_enabled=False,
)
source = app.topic(
    os.environ.get("CEILING_SOURCE", "bench-ceiling.in"),
    key_serializer="raw",
    value_serializer="raw",
)
sink = app.topic(
    os.environ.get("CEILING_SINK", "bench-ceiling.out"),
    key_serializer="raw",
    value_serializer="raw",
)
state = app.Table("state", partitions=6, key_type=str, value_type=bytes)


@app.agent(source, name="ceiling")
async def process(stream: faust.StreamT[bytes]) -> None:
    async for event in stream.events():
        value: bytes = event.message.value or b""
        data: dict[str, Any] = json.loads(value)
        key = data["escrowId"]
        state.get(key)
        state[key] = value
        await sink.send(key=key.encode(), value=value)


if __name__ == "__main__":
    app.main()
