"""Contract PDFs and delivery/dispute evidence in S3: presigned PUT URLs and existence checks.

Key layout (one prefix per escrow, so a key names the escrow it belongs to):

- evidence: ``escrows/{escrowId}/evidence/{uploadId}{ext}`` (ext from the content type)
- contract: ``escrows/{escrowId}/contract/{uploadId}.pdf``

An upload, in order:

1. The API checks the caller and the escrow, then :meth:`EvidenceStore.presign_put` signs a
   PUT for a fresh key (SigV4; the Content-Type, and the file name as metadata, are signed
   headers, so S3 refuses a PUT that sends others).  Signing is local: no call to S3.
2. The client PUTs the bytes to ``uploadUrl`` with exactly the returned headers before
   ``expiresAt`` (``PRESIGN_EXPIRY_S`` after signing).
3. A MarkDelivered or RaiseDispute then names the key in ``evidenceKeys``; the gateway
   accepts it only under that escrow's evidence prefix and only if :meth:`missing` finds
   the object (``head_object``).

Size: a presigned PUT cannot cap the body; S3's single-PUT limit (5 GB) applies.
``EVIDENCE_SIZE_MAX_BYTES`` is the documented client-side limit; enforcing it needs a
presigned POST policy (``content-length-range``) instead.

boto3 is synchronous: async callers get ``asyncio.to_thread`` wrappers.  The upload id comes
from the injected ``new_id``; the expiry is read back from the signed URL, because the
signer (botocore) stamps it with the wall clock and offers no clock to inject.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from escrow_stream.config import Settings

PRESIGN_EXPIRY_S = 900
EVIDENCE_SIZE_MAX_BYTES = 25 * 1024 * 1024
FILE_NAME_LENGTH_MAX = 200
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 10.0
ATTEMPTS_MAX = 3

EvidenceContentType = Literal[
    "application/pdf",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "text/plain",
    "video/mp4",
    "application/zip",
]
#: The extension each accepted evidence content type gives its key.
EVIDENCE_EXTENSIONS: dict[str, str] = {
    "application/pdf": ".pdf",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "text/plain": ".txt",
    "video/mp4": ".mp4",
    "application/zip": ".zip",
}
CONTRACT_CONTENT_TYPE = "application/pdf"
#: Object metadata carrying the uploader's file name (percent-encoded: headers are ASCII).
FILE_NAME_METADATA = "file-name"
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class StorageUnavailable(Exception):
    """S3 did not answer, or refused our own credentials: the operator's problem, not the
    caller's."""


def evidence_prefix(escrow_id: str) -> str:
    return f"escrows/{escrow_id}/evidence/"


def evidence_key(escrow_id: str, upload_id: str, content_type: str) -> str:
    return f"{evidence_prefix(escrow_id)}{upload_id}{EVIDENCE_EXTENSIONS[content_type]}"


def contract_key(escrow_id: str, upload_id: str) -> str:
    return f"escrows/{escrow_id}/contract/{upload_id}.pdf"


def is_evidence_key(escrow_id: str, key: str) -> bool:
    """True for one object directly under the escrow's evidence prefix.

    Escrow ids may contain ``/``, so a key of escrow ``a/evidence/b`` also starts with
    escrow ``a``'s prefix; requiring a single path segment after the prefix rules that out.
    """
    prefix = evidence_prefix(escrow_id)
    name = key[len(prefix) :]
    return key.startswith(prefix) and name != "" and "/" not in name


def url_expires_at(url: str) -> datetime:
    """When a SigV4 presigned URL stops working: ``X-Amz-Date`` + ``X-Amz-Expires``."""
    query = parse_qs(urlsplit(url).query)
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return signed_at + timedelta(seconds=int(query["X-Amz-Expires"][0]))


@dataclass(frozen=True)
class Upload:
    """A presigned PUT: the key it creates, where and how to send the bytes, until when."""

    key: str
    url: str
    headers: dict[str, str]
    expires_at: datetime
    method: str = "PUT"


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client from the settings: SigV4, bounded timeouts and retries, and
    path-style addressing when an endpoint (the stack's S3, MinIO) is given."""
    endpoint = settings.aws_endpoint_url
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": ATTEMPTS_MAX, "mode": "standard"},
    )
    return boto3.client(
        "s3",
        region_name=settings.aws_region,
        endpoint_url=endpoint,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value(),
        aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
        config=config,
    )


class EvidenceStore:
    """The bucket of contracts and evidence (``AWS_S3_BUCKET``)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        new_id: Callable[[], str],
        expiry_s: int = PRESIGN_EXPIRY_S,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.new_id = new_id
        self.expiry_s = expiry_s

    @classmethod
    def from_settings(cls, settings: Settings, new_id: Callable[[], str]) -> EvidenceStore:
        return cls(s3_client(settings), settings.aws_s3_bucket, new_id)

    def presign_put(self, key: str, content_type: str, file_name: str | None = None) -> Upload:
        """Step 1: sign a PUT of ``key`` that S3 accepts only with these headers."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "ContentType": content_type}
        headers = {"Content-Type": content_type}
        if file_name is not None:
            encoded = quote(file_name, safe="")
            params["Metadata"] = {FILE_NAME_METADATA: encoded}
            headers[f"x-amz-meta-{FILE_NAME_METADATA}"] = encoded
        url = self.client.generate_presigned_url(
            "put_object", Params=params, ExpiresIn=self.expiry_s, HttpMethod="PUT"
        )
        return Upload(key=key, url=url, headers=headers, expires_at=url_expires_at(url))

    async def evidence_upload(
        self, escrow_id: str, content_type: str, file_name: str | None = None
    ) -> Upload:
        key = evidence_key(escrow_id, self.new_id(), content_type)
        return await asyncio.to_thread(self.presign_put, key, content_type, file_name)

    async def contract_upload(self, escrow_id: str, file_name: str | None = None) -> Upload:
        key = contract_key(escrow_id, self.new_id())
        return await asyncio.to_thread(self.presign_put, key, CONTRACT_CONTENT_TYPE, file_name)

    def head(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES:
                return False
            raise StorageUnavailable(f"S3 refused head_object: {exc}") from None
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 did not answer: {exc}") from None
        return True

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.head, key)

    async def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys with no object, in order (at most EVIDENCE_KEYS_MAX checks at once)."""
        wanted = list(keys)
        found = await asyncio.gather(*(self.exists(k) for k in wanted))
        return [k for k, ok in zip(wanted, found, strict=True) if not ok]

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists: for tests and local tooling only; the service
        never creates buckets (production's is provisioned by the operator)."""
        params: dict[str, Any] = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        if region and region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**params)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
