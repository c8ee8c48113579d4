"""Evidence storage without a server: key layout, key validation, what a presigned PUT signs,
the development endpoint default, and the gateway's evidence check before it asks S3."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, get_args
from urllib.parse import parse_qs, urlsplit

import pytest

from escrow_stream.config import LOCAL_S3, load_settings
from escrow_stream.domain import parse_command
from escrow_stream.storage import (
    EVIDENCE_EXTENSIONS,
    PRESIGN_EXPIRY_S,
    EvidenceContentType,
    EvidenceStore,
    contract_key,
    evidence_key,
    is_evidence_key,
    url_expires_at,
)
from escrow_stream.web.evidence import check_evidence
from escrow_stream.web.problems import Problem
from tests.harness import production_env


def ids(*values: str) -> Any:
    it = iter(values)
    return lambda: next(it)


def store(**env: str) -> EvidenceStore:
    settings = load_settings({"AWS_S3_BUCKET": "bucket-1", **env})
    return EvidenceStore.from_settings(settings, ids("u-1", "u-2"))


def command(type_: str, escrow_id: str, payload: dict[str, Any]) -> Any:
    return parse_command(
        {
            "schemaVersion": 1,
            "commandId": "c-1",
            "type": type_,
            "escrowId": escrow_id,
            "actor": {"id": "seller-1", "role": "user"},
            "payload": payload,
            "issuedAt": "2026-01-01T00:00:00+00:00",
        }
    )


def test_key_layout() -> None:
    assert evidence_key("e-1", "u-1", "image/jpeg") == "escrows/e-1/evidence/u-1.jpg"
    assert evidence_key("e-1", "u-1", "application/pdf") == "escrows/e-1/evidence/u-1.pdf"
    assert contract_key("e-1", "u-1") == "escrows/e-1/contract/u-1.pdf"
    assert set(EVIDENCE_EXTENSIONS) == set(get_args(EvidenceContentType))


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("escrows/e-1/evidence/u-1.png", True),
        ("escrows/e-1/evidence/", False),  # the prefix is no upload
        ("escrows/e-2/evidence/u-1.png", False),  # another escrow's
        ("escrows/e-1/contract/u-1.pdf", False),  # the contract is no evidence
        ("escrows/e-1/evidence/x/y.png", False),  # nested: see the next case
        ("uploads/escrows/e-1/evidence/u-1.png", False),
    ],
)
def test_evidence_keys_must_be_the_escrows_own(key: str, ok: bool) -> None:
    assert is_evidence_key("e-1", key) is ok


def test_an_escrow_id_with_slashes_cannot_claim_a_shorter_ids_uploads() -> None:
    # escrow "e-1/evidence/x" uploads to escrows/e-1/evidence/x/evidence/..., under e-1's prefix
    theirs = evidence_key("e-1/evidence/x", "u-1", "image/png")
    assert is_evidence_key("e-1/evidence/x", theirs)
    assert not is_evidence_key("e-1", theirs)


async def test_presigned_put_signs_content_type_and_file_name_path_style() -> None:
    s = store()
    before = datetime.now(UTC).replace(microsecond=0)
    upload = await s.evidence_upload("e-1", "image/png", "proof #1 é.png")
    parts = urlsplit(upload.url)
    query = parse_qs(parts.query)
    assert upload.key == "escrows/e-1/evidence/u-1.png"
    assert f"{parts.scheme}://{parts.netloc}" == LOCAL_S3  # the development default
    assert parts.path == "/bucket-1/escrows/e-1/evidence/u-1.png"  # path-style addressing
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-SignedHeaders"] == ["content-type;host;x-amz-meta-file-name"]
    assert query["X-Amz-Expires"] == [str(PRESIGN_EXPIRY_S)]
    assert upload.headers == {
        "Content-Type": "image/png",
        "x-amz-meta-file-name": "proof%20%231%20%C3%A9.png",
    }
    assert upload.method == "PUT"
    assert upload.expires_at == url_expires_at(upload.url)
    assert before + timedelta(seconds=PRESIGN_EXPIRY_S) <= upload.expires_at
    assert upload.expires_at <= datetime.now(UTC) + timedelta(seconds=PRESIGN_EXPIRY_S)


async def test_contract_is_a_pdf_under_the_contract_prefix() -> None:
    upload = await store().contract_upload("e-1")
    assert upload.key == "escrows/e-1/contract/u-1.pdf"
    assert upload.headers == {"Content-Type": "application/pdf"}


def test_development_defaults_to_the_stacks_s3_and_production_to_aws() -> None:
    assert load_settings({}).aws_endpoint_url == LOCAL_S3
    assert load_settings({"AWS_ENDPOINT_URL": "http://minio:9000"}).aws_endpoint_url == (
        "http://minio:9000"
    )
    assert load_settings(production_env()).aws_endpoint_url is None


async def test_foreign_evidence_keys_are_refused_before_s3_is_asked() -> None:
    # an endpoint where nothing listens: a call to S3 would fail with 503, not this 422
    s = store(AWS_ENDPOINT_URL="http://127.0.0.1:9")
    mine = "escrows/e-1/evidence/u-1.png"
    theirs = "escrows/e-2/evidence/u-9.png"
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("MarkDelivered", {"evidenceKeys": [mine, theirs]}, "evidenceKeys.1"),
        (
            "RaiseDispute",
            {"reason": "not as described", "evidenceKeys": [theirs]},
            "evidenceKeys.0",
        ),
    ]
    for type_, payload, field in cases:
        with pytest.raises(Problem) as refused:
            await check_evidence(s, command(type_, "e-1", payload))
        assert (refused.value.status, refused.value.code) == (422, "EVIDENCE_KEY_INVALID")
        assert theirs in refused.value.detail
        assert [e["field"] for e in refused.value.errors or []] == [field]


async def test_commands_without_evidence_never_ask_s3() -> None:
    s = store(AWS_ENDPOINT_URL="http://127.0.0.1:9")
    await check_evidence(s, command("MarkDelivered", "e-1", {"note": "shipped"}))
    await check_evidence(s, command("CancelEscrow", "e-1", {"reason": "BUYER_CANCELLED"}))
