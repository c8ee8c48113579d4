"""EvidenceStore against the stack's S3 (``scripts/stack.sh up s3``): presigned PUTs upload
exactly what they signed, S3 refuses anything else, and existence checks are real."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from escrow_stream.config import LOCAL_S3, load_settings
from escrow_stream.storage import EvidenceStore, StorageUnavailable
from tests.harness import free_port, reachable, stack_environ, unique

pytestmark = pytest.mark.integration


def s3_store(bucket: str, **env: str) -> EvidenceStore:
    settings = load_settings(stack_environ(AWS_S3_BUCKET=bucket, **env))
    return EvidenceStore.from_settings(settings, lambda: uuid.uuid4().hex)


@pytest.fixture(scope="module")
def store() -> Iterator[EvidenceStore]:
    endpoint = urlsplit(LOCAL_S3)
    if not reachable(endpoint.hostname or "127.0.0.1", endpoint.port or 80):
        pytest.fail(f"no S3 at {LOCAL_S3}: run `make stack-up` (or `scripts/stack.sh up s3`)")
    s = s3_store(f"escrow-{unique('it')}")
    s.ensure_bucket()
    s.ensure_bucket()  # idempotent
    yield s


def put(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.put(url, content=body, headers=headers, timeout=10)


async def test_presigned_put_uploads_the_bytes_it_was_signed_for(store: EvidenceStore) -> None:
    body = b"%PDF-1.4\n" + bytes(range(256)) * 40
    upload = await store.evidence_upload("e-1", "application/pdf", "delivery note.pdf")
    assert not await store.exists(upload.key)
    response = put(upload.url, body, upload.headers)
    assert response.status_code == 200, response.text
    stored = store.client.get_object(Bucket=store.bucket, Key=upload.key)
    assert stored["Body"].read() == body
    assert stored["ContentType"] == "application/pdf"
    assert stored["Metadata"] == {"file-name": "delivery%20note.pdf"}
    assert await store.exists(upload.key)
    other = f"escrows/e-1/evidence/{uuid.uuid4().hex}.png"
    assert await store.missing([upload.key, other]) == [other]


async def test_s3_refuses_a_put_that_differs_from_what_was_signed(store: EvidenceStore) -> None:
    upload = await store.evidence_upload("e-1", "image/png")
    tampered = upload.url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    other_key = upload.url.replace(upload.key.rsplit("/", 1)[1], "other.png")
    refused = [
        put(upload.url, b"<html>", {"Content-Type": "text/html"}),  # another content type
        put(upload.url, b"\x89PNG", {}),  # none
        put(tampered, b"\x89PNG", upload.headers),
        put(other_key, b"\x89PNG", upload.headers),  # the signature is for one key only
    ]
    for response in refused:
        assert response.status_code == 403, response.text
        assert "<Code>SignatureDoesNotMatch</Code>" in response.text
    assert await store.missing([upload.key]) == [upload.key]


async def test_an_expired_url_is_refused(store: EvidenceStore) -> None:
    short = EvidenceStore(store.client, store.bucket, store.new_id, expiry_s=1)
    upload = await short.evidence_upload("e-1", "text/plain")
    await asyncio.sleep(max(0.0, upload.expires_at.timestamp() - time.time()) + 1.1)
    response = put(upload.url, b"late", upload.headers)
    assert response.status_code == 403 and "Request has expired" in response.text
    assert not await store.exists(upload.key)


async def test_s3_down_is_storage_unavailable_not_missing() -> None:
    down = s3_store("any-bucket", AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable):
        await down.exists("escrows/e-1/evidence/u-1.png")
