"""Connection settings shared by every Kafka client we build (admin, producers, consumers)."""

from __future__ import annotations

import ssl
from typing import Any

from escrow_stream.config import Settings


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for the configured brokers, SASL and TLS."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.kafka_client_id,
    }
    sasl = settings.kafka_sasl_username is not None
    if settings.kafka_ssl_enabled:
        kwargs["ssl_context"] = ssl.create_default_context()
    if sasl:
        kwargs["security_protocol"] = "SASL_SSL" if settings.kafka_ssl_enabled else "SASL_PLAINTEXT"
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism.upper()
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        password = settings.kafka_sasl_password
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else ""
    elif settings.kafka_ssl_enabled:
        kwargs["security_protocol"] = "SSL"
    return kwargs


async def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partition numbers of ``topic`` (empty when it does not exist)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if not described or described[0]["error_code"] != 0:
        return []
    return sorted(p["partition"] for p in described[0]["partitions"])


class SharedAdmin:
    """One admin client for the process, started on first use and started again after an
    error (a broker restart), so a probe polled every second opens no connection per call."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: Any = None

    async def describe_cluster(self) -> Any:
        from aiokafka.admin import AIOKafkaAdminClient

        if self._admin is None:
            admin = AIOKafkaAdminClient(**client_kwargs(self.settings))
            await admin.start()
            self._admin = admin
        try:
            return await self._admin.describe_cluster()
        except Exception:
            await self.close()
            raise

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()
