"""Uploads to S3 (SPEC §4-§5): presigned PUT URLs for evidence and contracts, and the check
that a delivery's or dispute's ``evidenceKeys`` name objects uploaded for that escrow.

``POST /api/escrow/{id}/evidence`` (the escrow's parties and admins) and
``POST /api/escrow/{id}/contract`` (services and admins), in order:

1. Authenticate; for a contract, the role (403) before anything about the escrow is read.
2. Validate the body: ``contentType`` from the accepted list (contract: PDF only) and an
   optional ``fileName`` (400 bad JSON, 415, 422).
3. Read the escrow from its owning worker: 404 unknown; for evidence, 403 unless a party
   or an admin.
4. Sign a PUT for a fresh key under the escrow's prefix and answer 201 with the URL and the
   headers the upload must carry (:mod:`escrow_stream.storage`, steps 1-2).

MarkDelivered and RaiseDispute are checked before acceptance by :func:`check_evidence`,
which the composition root (``app.py``) hands to the escrow views (``web/escrows.py``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import faust
from faust.web import Request, Response, View
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from escrow_stream.domain import Command, MarkDelivered, RaiseDispute
from escrow_stream.storage import (
    FILE_NAME_LENGTH_MAX,
    EvidenceContentType,
    EvidenceStore,
    StorageUnavailable,
    Upload,
    evidence_prefix,
    is_evidence_key,
)
from escrow_stream.web.auth import Role
from escrow_stream.web.gateway import Gateway, authorization, json_response, may_read
from escrow_stream.web.problems import Problem
from escrow_stream.web.reads import EscrowReader


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    file_name: str | None = Field(
        None,
        min_length=1,
        max_length=FILE_NAME_LENGTH_MAX,
        description="the uploader's file name, kept as object metadata",
    )


class EvidenceUploadBody(_In):
    """``POST /api/escrow/{id}/evidence``: what will be uploaded."""

    content_type: EvidenceContentType


class ContractUploadBody(_In):
    """``POST /api/escrow/{id}/contract``: the contract is a PDF."""

    content_type: Literal["application/pdf"]


class UploadTicket(BaseModel):
    """201: PUT the bytes to ``uploadUrl`` with exactly ``headers`` before ``expiresAt``."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel)

    key: str
    upload_url: str
    method: Literal["PUT"] = "PUT"
    headers: dict[str, str]
    expires_at: datetime


def ticket(upload: Upload) -> dict[str, object]:
    body = UploadTicket(
        key=upload.key, upload_url=upload.url, headers=upload.headers, expires_at=upload.expires_at
    )
    return body.model_dump(mode="json", by_alias=True)


async def check_evidence(store: EvidenceStore, command: Command) -> None:
    """Every evidence key of a MarkDelivered/RaiseDispute lies under the escrow's evidence
    prefix (422 ``EVIDENCE_KEY_INVALID``) and was uploaded (422 ``EVIDENCE_NOT_FOUND``)."""
    if not isinstance(command, MarkDelivered | RaiseDispute):
        return
    keys = list(command.payload.evidence_keys)
    prefix = evidence_prefix(command.escrow_id)
    foreign = {k for k in keys if not is_evidence_key(command.escrow_id, k)}
    if foreign:
        raise _keys_problem(
            "EVIDENCE_KEY_INVALID",
            keys,
            foreign,
            f"is not an upload of this escrow (under {prefix})",
            f"is not under {prefix}",
        )
    try:
        missing = set(await store.missing(keys))
    except StorageUnavailable as exc:
        raise Problem(503, "STORAGE_UNAVAILABLE", str(exc)) from None
    if missing:
        raise _keys_problem(
            "EVIDENCE_NOT_FOUND", keys, missing, "has no upload", "was not uploaded"
        )


def _keys_problem(code: str, keys: list[str], bad: set[str], what: str, each: str) -> Problem:
    """A 422 naming the first bad evidence key, and each bad one at its place in the list."""
    places = [(i, k) for i, k in enumerate(keys) if k in bad]
    return Problem(
        422,
        code,
        f"evidence key {places[0][1]!r} {what}",
        errors=[{"field": f"evidenceKeys.{i}", "message": f"{k!r} {each}"} for i, k in places],
    )


def register(app: faust.App, gateway: Gateway, reader: EscrowReader, store: EvidenceStore) -> None:
    """Register the upload views."""

    @app.page("/api/escrow/{escrow_id}/evidence")
    class EvidenceUpload(View):
        async def post(self, request: Request, escrow_id: str) -> Response:
            principal = await gateway.principal(request)
            body, _ = await gateway.body(request, EvidenceUploadBody)
            assert isinstance(body, EvidenceUploadBody)
            escrow = await reader.existing(escrow_id, authorization(request))
            if not may_read(principal, escrow):
                raise Problem(
                    403, "NOT_AUTHORIZED", "only the escrow's parties and admins upload evidence"
                )
            upload = await store.evidence_upload(escrow_id, body.content_type, body.file_name)
            return json_response(self, ticket(upload), 201)

    @app.page("/api/escrow/{escrow_id}/contract")
    class ContractUpload(View):
        async def post(self, request: Request, escrow_id: str) -> Response:
            principal = await gateway.principal(request)
            if principal.role not in (Role.SERVICE, Role.ADMIN):
                raise Problem(
                    403, "NOT_AUTHORIZED", "contracts are uploaded by services and admins"
                )
            body, _ = await gateway.body(request, ContractUploadBody)
            assert isinstance(body, ContractUploadBody)
            await reader.existing(escrow_id, authorization(request))
            upload = await store.contract_upload(escrow_id, body.file_name)
            return json_response(self, ticket(upload), 201)
