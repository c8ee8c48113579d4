"""The OpenAPI 3.1 document, generated from the pydantic models the handlers validate with.

One function per group of paths; the module is a little over 400 lines because it is
declarative (each path's summary, parameters and responses), with no logic to split out.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from escrow_stream import __version__
from escrow_stream.domain import Escrow
from escrow_stream.web.schemas import (
    Accepted,
    CommandStatus,
    CreateEscrowBody,
    EmptyBody,
    EscrowHistory,
    EscrowPage,
    Health,
    KycBody,
    KycStatus,
    PaymentInstructions,
    ProblemBody,
    Readiness,
)

REF = "#/components/schemas/{model}"
PROBLEM_STATUSES = ("400", "401", "403", "404", "409", "413", "415", "422", "429", "503")


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _problems(*statuses: str) -> dict[str, Any]:
    return {
        s: {
            "description": "problem details (RFC 9457)",
            "content": {"application/problem+json": {"schema": _ref(ProblemBody)}},
        }
        for s in statuses
    }


def _command(summary: str, body: type[BaseModel] | None, created: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 200},
            },
            {
                "name": "Prefer",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^wait=[0-9.]+$"},
            },
        ],
        "responses": {
            "202": _json(Accepted, "accepted: in the outbox, processed asynchronously"),
            ("201" if created else "200"): _json(Escrow, "with Prefer: wait, the outcome"),
            **_problems(*PROBLEM_STATUSES),
        },
    }
    if body is not None and body is not EmptyBody:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return operation


def _read(summary: str, model: type[BaseModel], *problems: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {"200": _json(model, "ok"), **_problems(*problems)},
    }


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


ESCROW_ID = _path_param("escrow_id")
USER_ID = _path_param("user_id")


def _operations_paths() -> dict[str, Any]:
    """``/health``, ``/ready``, ``/metrics``."""
    return {
        "/health": {"get": {"summary": "liveness", "responses": {"200": _json(Health, "ok")}}},
        "/ready": {
            "get": {
                "summary": "readiness: processor (joined, recovered), Kafka, PostgreSQL, Redis",
                "responses": {
                    "200": _json(Readiness, "ready"),
                    "503": _json(Readiness, "a dependency is down"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def _escrow_paths() -> dict[str, Any]:
    """Creating, listing and reading escrows, their history and their commands' outcomes."""

    def read(summary: str, model: type[BaseModel], *params: dict[str, Any]) -> dict[str, Any]:
        return {"get": {**_read(summary, model, "401", "403", "404"), "parameters": list(params)}}

    listing = _read("list escrows (user: own; admin: all) from the mirror", EscrowPage, "400")
    listing["responses"].update(_problems("401", "403"))
    return {
        "/api/escrow": {
            "post": _command(
                "create an escrow (user: as the buyer; service: for a buyer)",
                CreateEscrowBody,
                created=True,
            ),
            "get": {
                **listing,
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                    for n in ("status", "rail", "role", "cursor", "limit")
                ],
            },
        },
        "/api/escrow/{escrow_id}": read("one escrow, from its owning worker", Escrow, ESCROW_ID),
        "/api/escrow/{escrow_id}/payment": read(
            "how to pay, with the Stripe client secret (the buyer alone)",
            PaymentInstructions,
            ESCROW_ID,
        ),
        "/api/escrow/{escrow_id}/events": read("history from the mirror", EscrowHistory, ESCROW_ID),
        "/api/escrow/{escrow_id}/commands/{command_id}": read(
            "the outcome of one command", CommandStatus, ESCROW_ID, _path_param("command_id")
        ),
    }


def _action_paths() -> dict[str, Any]:
    """One POST per escrow command (``/api/escrow/{id}/…``) and per milestone command."""
    from escrow_stream.web.escrows import ACTIONS, MILESTONE_ACTIONS

    paths: dict[str, Any] = {}
    for suffix, (command_type, body) in ACTIONS.items():
        operation = _command(command_type, body, created=False)
        operation["parameters"] = [ESCROW_ID, *operation["parameters"]]
        paths[f"/api/escrow/{{escrow_id}}/{suffix}"] = {"post": operation}
    for suffix, command_type in MILESTONE_ACTIONS.items():
        operation = _command(command_type, None, created=False)
        operation["parameters"] = [
            ESCROW_ID,
            _path_param("milestone_id"),
            *operation["parameters"],
        ]
        paths[f"/api/escrow/{{escrow_id}}/milestones/{{milestone_id}}/{suffix}"] = {
            "post": operation
        }
    return paths


def _upload_paths() -> dict[str, Any]:
    """Presigned S3 uploads of evidence and contracts."""
    from escrow_stream.storage import EVIDENCE_SIZE_MAX_BYTES
    from escrow_stream.web.evidence import ContractUploadBody, EvidenceUploadBody, UploadTicket

    uploads = (
        ("evidence", EvidenceUploadBody, "presigned S3 PUT for evidence (parties, admin)"),
        ("contract", ContractUploadBody, "presigned S3 PUT for the contract PDF (service, admin)"),
    )
    return {
        f"/api/escrow/{{escrow_id}}/{suffix}": {
            "post": {
                "summary": summary,
                "description": "PUT the bytes to uploadUrl with exactly the returned headers "
                "before expiresAt; the key then goes into evidenceKeys (evidence). A presigned "
                f"PUT cannot cap the size: keep uploads under {EVIDENCE_SIZE_MAX_BYTES} bytes.",
                "security": [{"bearer": []}],
                "parameters": [ESCROW_ID],
                "requestBody": _body(upload_body),
                "responses": {
                    "201": _json(UploadTicket, "the presigned upload"),
                    **_problems("400", "401", "403", "404", "415", "422", "429", "503"),
                },
            }
        }
        for suffix, upload_body, summary in uploads
    }


def _webhook_and_kyc_paths() -> dict[str, Any]:
    """Stripe's webhook and a user's KYC status."""
    stripe_signature = {
        "name": "Stripe-Signature",
        "in": "header",
        "required": True,
        "schema": {"type": "string"},
    }
    kyc_put = _read("set a user's KYC status (admin, service)", KycStatus, "400", "401", "403")
    kyc_put["responses"].update(_problems("415", "422"))
    return {
        "/api/webhooks/stripe": {
            "post": {
                "summary": "Stripe events (Stripe-Signature over the raw body)",
                "parameters": [stripe_signature],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": {
                        "description": "received (acted on, ignored or a replay)",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_problems("400", "409"),
                },
            }
        },
        "/api/kyc/{user_id}": {
            "get": {
                **_read("a user's KYC status (admin, service, the user)", KycStatus, "401", "403"),
                "parameters": [USER_ID],
            },
            "put": {**kyc_put, "parameters": [USER_ID], "requestBody": _body(KycBody)},
        },
    }


def _own_payout_paths() -> dict[str, Any]:
    """``/api/payout-accounts/{stripe,usdc,me}``: a seller's own payout accounts (SPEC §10)."""
    from escrow_stream.web.payouts import PayoutAccountList, PayoutAccountOut, WalletBody

    return {
        "/api/payout-accounts/stripe": {
            "post": {
                "summary": "the seller's Stripe Connect Express account and a fresh "
                "onboarding link (a user, for themselves); ACTIVE once Stripe's "
                "account.updated says payouts_enabled",
                "security": [{"bearer": []}],
                "responses": {
                    "201": _json(PayoutAccountOut, "the account, with onboardingUrl"),
                    **_problems("401", "403", "429", "503"),
                },
            }
        },
        "/api/payout-accounts/usdc": {
            "put": {
                "summary": "the seller's USDC wallet on Base (a user, for themselves), "
                "screened with TRM Labs and Chainalysis",
                "security": [{"bearer": []}],
                "requestBody": _body(WalletBody),
                "responses": {
                    "200": _json(PayoutAccountOut, "screened: ACTIVE, or REJECTED if flagged"),
                    "202": _json(PayoutAccountOut, "PENDING: screened again later"),
                    **_problems("400", "401", "403", "415", "422", "429"),
                },
            }
        },
        "/api/payout-accounts/me": {
            "get": _read("the caller's payout accounts (a user)", PayoutAccountList, "401", "403")
        },
    }


def _user_payout_paths() -> dict[str, Any]:
    """``/api/payout-accounts/{user_id}``: services and admins (SPEC §10)."""
    from escrow_stream.web.payouts import PayoutAccountBody, PayoutAccountList, PayoutAccountOut

    return {
        "/api/payout-accounts/{user_id}": {
            "get": {
                **_read(
                    "a user's payout accounts (service, admin, the user)",
                    PayoutAccountList,
                    "401",
                    "403",
                ),
                "parameters": [USER_ID],
            },
            "put": {
                "summary": "set a user's payout account (service, admin): a Connect account "
                "is ACTIVE only if Stripe pays out to it, a wallet only once screened clean",
                "security": [{"bearer": []}],
                "parameters": [USER_ID],
                "requestBody": _body(PayoutAccountBody),
                "responses": {
                    "200": _json(PayoutAccountOut, "the account"),
                    "202": _json(PayoutAccountOut, "a wallet PENDING: screened again later"),
                    **_problems("400", "401", "403", "415", "422", "429", "503"),
                },
            },
        },
    }


def _admin_paths() -> dict[str, Any]:
    """``/api/admin/…`` (SPEC §10): operators' views."""
    from escrow_stream.db.unmatched import FundsStatus
    from escrow_stream.web.admin import LIMIT_MAX, UnmatchedFundsList

    def query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema}

    return {
        "/api/admin/unmatched-funds": {
            "get": {
                **_read(
                    "money no escrow accepted, newest first (admin): returned, frozen for "
                    "compliance, or waiting for review",
                    UnmatchedFundsList,
                    "401",
                    "403",
                    "422",
                    "429",
                ),
                "parameters": [
                    query("status", {"type": "string", "enum": [s.value for s in FundsStatus]}),
                    query("escrowId", {"type": "string"}),
                    query("limit", {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX}),
                ],
            }
        }
    }


def _models() -> list[type[BaseModel]]:
    """Every model the paths name, for ``components.schemas``."""
    from escrow_stream.web.admin import UnmatchedFundsList, UnmatchedFundsOut
    from escrow_stream.web.escrows import ACTIONS
    from escrow_stream.web.evidence import ContractUploadBody, EvidenceUploadBody, UploadTicket
    from escrow_stream.web.payouts import (
        PayoutAccountBody,
        PayoutAccountList,
        PayoutAccountOut,
        WalletBody,
    )

    models: list[type[BaseModel]] = [
        Accepted,
        CommandStatus,
        CreateEscrowBody,
        EscrowHistory,
        EscrowPage,
        Health,
        ProblemBody,
        Readiness,
        Escrow,
        KycBody,
        KycStatus,
        PaymentInstructions,
    ]
    models += [body for _, body in ACTIONS.values() if body not in models]
    return [
        *models,
        EvidenceUploadBody,
        ContractUploadBody,
        UploadTicket,
        PayoutAccountBody,
        PayoutAccountList,
        PayoutAccountOut,
        WalletBody,
        UnmatchedFundsList,
        UnmatchedFundsOut,
    ]


def openapi_document(api_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document; ``servers`` names ``api_url`` (API_URL) when it is given."""
    paths: dict[str, Any] = {}
    for section in (
        _operations_paths,
        _escrow_paths,
        _webhook_and_kyc_paths,
        _own_payout_paths,
        _user_payout_paths,
        _admin_paths,
        _upload_paths,
        _action_paths,
    ):
        paths.update(section())
    _, schemas = models_json_schema(
        [(m, "validation" if m.__name__.endswith("Body") else "serialization") for m in _models()],
        ref_template=REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "escrow-stream", "version": __version__},
        **({"servers": [{"url": api_url.rstrip("/")}]} if api_url else {}),
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
