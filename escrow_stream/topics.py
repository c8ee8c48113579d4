"""Topic definitions (names, partitions, policies) and their creation and verification."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from escrow_stream.config import ConfigError, Settings
from escrow_stream.kafka import client_kwargs

RETENTION_90_DAYS_MS = 90 * 24 * 60 * 60 * 1000
ERROR_TOPIC_ALREADY_EXISTS = 36
ADMIN_TIMEOUT_MS = 30_000

COMMANDS_PARTITIONS = 6
EVENTS_PARTITIONS = 12


class ReplicationFactorTooLarge(ConfigError):
    """A topic would need more replicas than the cluster has brokers; nothing was created."""

    def __init__(self, replication_factor: int, brokers: int, names: list[str]) -> None:
        self.replication_factor = replication_factor
        self.brokers = brokers
        self.names = names
        super().__init__(
            f"Error: replication factor {replication_factor} is larger than the Kafka "
            f"cluster's broker count ({brokers}); no topics were created "
            f"(topics: {', '.join(names)}).\n"
            f"Set KAFKA_REPLICATION_FACTOR to at most {brokers} (it defaults to 3 with "
            "NODE_ENV=production, 1 otherwise), or add brokers."
        )


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: Mapping[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics of SPEC §3; Faust creates its own changelog topics."""
    rf = settings.kafka_replication_factor

    def spec(name: str, partitions: int, cleanup: str = "delete") -> TopicSpec:
        return TopicSpec(
            name=name,
            partitions=partitions,
            replication_factor=rf,
            configs={
                "cleanup.policy": cleanup,
                "retention.ms": str(RETENTION_90_DAYS_MS),
                "compression.type": settings.kafka_compression,
            },
        )

    return [
        spec(settings.kafka_commands_topic, COMMANDS_PARTITIONS),
        spec(settings.kafka_events_topic, EVENTS_PARTITIONS, cleanup="compact"),
        spec(settings.kafka_rejections_topic, COMMANDS_PARTITIONS),
        spec(settings.kafka_dlq_topic, COMMANDS_PARTITIONS),
    ]


def _admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(request_timeout_ms=ADMIN_TIMEOUT_MS, **client_kwargs(settings))


async def create_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Create the missing topics; returns one line per topic saying what happened.

    1. Ask the cluster how many brokers it has: a replication factor above that is refused
       (:class:`ReplicationFactorTooLarge`) before anything is created.
    2. Create the topics that do not exist yet; existing topics are left as they are
       (``verify_topics`` reports any difference).
    """
    specs = topic_specs(settings) if specs is None else specs
    admin = _admin(settings)
    await admin.start()
    try:
        await _check_replication(admin, specs)
        existing = set(await admin.list_topics())
        wanted = [s for s in specs if s.name not in existing]
        report = [f"exists  {s.name}" for s in specs if s.name in existing]
        if wanted:
            response = await admin.create_topics(
                [
                    NewTopic(
                        s.name, s.partitions, s.replication_factor, topic_configs=dict(s.configs)
                    )
                    for s in wanted
                ],
                timeout_ms=ADMIN_TIMEOUT_MS,
            )
            for name, code, *rest in response.topic_errors:
                if code not in (0, ERROR_TOPIC_ALREADY_EXISTS):
                    message = rest[0] if rest else ""
                    raise RuntimeError(f"creating topic {name} failed: error {code} {message}")
                report.append(f"created {name}")
        return report
    finally:
        await admin.close()


async def broker_count(admin: AIOKafkaAdminClient) -> int:
    """How many brokers the cluster has, as the cluster itself says."""
    cluster = await admin.describe_cluster()
    return len(cluster["brokers"])


async def _check_replication(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    if not specs:
        return
    brokers = await broker_count(admin)
    too_many = [s for s in specs if s.replication_factor > brokers]
    if too_many:
        factor = max(s.replication_factor for s in too_many)
        raise ReplicationFactorTooLarge(factor, brokers, [s.name for s in too_many])


async def verify_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Compare the broker's topics with the definitions; returns the differences."""
    specs = topic_specs(settings) if specs is None else specs
    admin = _admin(settings)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in specs])}
        problems: list[str] = []
        present: list[TopicSpec] = []
        for s in specs:
            topic = described.get(s.name)
            if topic is None or topic["error_code"] != 0 or not topic["partitions"]:
                problems.append(f"{s.name}: missing")
                continue
            present.append(s)
            partitions = len(topic["partitions"])
            if partitions != s.partitions:
                problems.append(f"{s.name}: partitions {partitions}, expected {s.partitions}")
            replicas = min(len(p["replicas"]) for p in topic["partitions"])
            if replicas != s.replication_factor:
                problems.append(
                    f"{s.name}: replication factor {replicas}, expected {s.replication_factor}"
                )
        if present:
            actual = await _topic_configs(admin, [s.name for s in present])
            for s in present:
                for key, want in s.configs.items():
                    got = actual.get(s.name, {}).get(key)
                    if got != want:
                        problems.append(f"{s.name}: {key}={got}, expected {want}")
        return problems
    finally:
        await admin.close()


async def _topic_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    )
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            resource_name, entries = resource[3], resource[4]
            out[resource_name] = {entry[0]: entry[1] for entry in entries}
    return out
