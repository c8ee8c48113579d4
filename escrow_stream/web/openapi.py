"""The OpenAPI 3.1 document, generated from the pydantic models the handlers validate with."""

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


def _payout_models() -> list[type[BaseModel]]:
    from escrow_stream.web.payouts import (
        PayoutAccountBody,
        PayoutAccountList,
        PayoutAccountOut,
        WalletBody,
    )

    return [PayoutAccountBody, PayoutAccountList, PayoutAccountOut, WalletBody]


def _payout_paths() -> dict[str, Any]:
    """``/api/payout-accounts/…`` (SPEC §10)."""
    from escrow_stream.web.payouts import (
        PayoutAccountBody,
        PayoutAccountList,
        PayoutAccountOut,
        WalletBody,
    )

    user_param = {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"}}

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}

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
                "requestBody": body(WalletBody),
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
        "/api/payout-accounts/{user_id}": {
            "get": {
                **_read(
                    "a user's payout accounts (service, admin, the user)",
                    PayoutAccountList,
                    "401",
                    "403",
                ),
                "parameters": [user_param],
            },
            "put": {
                "summary": "set a user's payout account (service, admin): a Connect account "
                "is ACTIVE only if Stripe pays out to it, a wallet only once screened clean",
                "security": [{"bearer": []}],
                "parameters": [user_param],
                "requestBody": body(PayoutAccountBody),
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
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": [s.value for s in FundsStatus]},
                    },
                    {
                        "name": "escrowId",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX},
                    },
                ],
            }
        }
    }


def openapi_document() -> dict[str, Any]:
    from escrow_stream.storage import EVIDENCE_SIZE_MAX_BYTES
    from escrow_stream.web.escrows import ACTIONS, MILESTONE_ACTIONS
    from escrow_stream.web.evidence import ContractUploadBody, EvidenceUploadBody, UploadTicket

    id_param = {"name": "escrow_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
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
        "/api/escrow": {
            "post": _command(
                "create an escrow (user: as the buyer; service: for a buyer)",
                CreateEscrowBody,
                created=True,
            ),
            "get": {
                **_read(
                    "list escrows (user: own; admin: all) from the mirror",
                    EscrowPage,
                    "400",
                    "401",
                    "403",
                ),
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                    for n in ("status", "rail", "role", "cursor", "limit")
                ],
            },
        },
        "/api/escrow/{escrow_id}": {
            "get": {
                **_read("one escrow, from its owning worker", Escrow, "401", "403", "404"),
                "parameters": [id_param],
            }
        },
        "/api/escrow/{escrow_id}/payment": {
            "get": {
                **_read(
                    "how to pay, with the Stripe client secret (the buyer alone)",
                    PaymentInstructions,
                    "401",
                    "403",
                    "404",
                ),
                "parameters": [id_param],
            }
        },
        "/api/escrow/{escrow_id}/events": {
            "get": {
                **_read("history from the mirror", EscrowHistory, "401", "403", "404"),
                "parameters": [id_param],
            }
        },
        "/api/escrow/{escrow_id}/commands/{command_id}": {
            "get": {
                **_read("the outcome of one command", CommandStatus, "401", "403", "404"),
                "parameters": [
                    id_param,
                    {
                        "name": "command_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                ],
            }
        },
    }
    paths["/api/webhooks/stripe"] = {
        "post": {
            "summary": "Stripe events (Stripe-Signature over the raw body)",
            "parameters": [
                {
                    "name": "Stripe-Signature",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
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
    }
    paths["/api/kyc/{user_id}"] = {
        "get": {
            **_read("a user's KYC status (admin, service, the user)", KycStatus, "401", "403"),
            "parameters": [
                {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
        },
        "put": {
            **_read(
                "set a user's KYC status (admin, service)",
                KycStatus,
                "400",
                "401",
                "403",
                "415",
                "422",
            ),
            "parameters": [
                {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(KycBody)}},
            },
        },
    }
    paths.update(_payout_paths())
    paths.update(_admin_paths())
    uploads = (
        ("evidence", EvidenceUploadBody, "presigned S3 PUT for evidence (parties, admin)"),
        ("contract", ContractUploadBody, "presigned S3 PUT for the contract PDF (service, admin)"),
    )
    for suffix, upload_body, summary in uploads:
        paths[f"/api/escrow/{{escrow_id}}/{suffix}"] = {
            "post": {
                "summary": summary,
                "description": "PUT the bytes to uploadUrl with exactly the returned headers "
                "before expiresAt; the key then goes into evidenceKeys (evidence). A presigned "
                f"PUT cannot cap the size: keep uploads under {EVIDENCE_SIZE_MAX_BYTES} bytes.",
                "security": [{"bearer": []}],
                "parameters": [id_param],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(upload_body)}},
                },
                "responses": {
                    "201": _json(UploadTicket, "the presigned upload"),
                    **_problems("400", "401", "403", "404", "415", "422", "429", "503"),
                },
            }
        }
    for suffix, (command_type, body) in ACTIONS.items():
        paths[f"/api/escrow/{{escrow_id}}/{suffix}"] = {
            "post": {
                **_command(command_type, body, created=False),
                "parameters": [
                    id_param,
                    *_command(command_type, body, created=False)["parameters"],
                ],
            }
        }
    milestone_param = {
        "name": "milestone_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    for suffix, command_type in MILESTONE_ACTIONS.items():
        operation = _command(command_type, None, created=False)
        operation["parameters"] = [id_param, milestone_param, *operation["parameters"]]
        paths[f"/api/escrow/{{escrow_id}}/milestones/{{milestone_id}}/{suffix}"] = {
            "post": operation
        }

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
    models += [EvidenceUploadBody, ContractUploadBody, UploadTicket]
    models += _payout_models()
    from escrow_stream.web.admin import UnmatchedFundsList, UnmatchedFundsOut

    models += [UnmatchedFundsList, UnmatchedFundsOut]
    _, schemas = models_json_schema(
        [(m, "validation" if m.__name__.endswith("Body") else "serialization") for m in models],
        ref_template=REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "escrow-stream", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
