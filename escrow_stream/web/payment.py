"""``GET /api/escrow/{id}/payment``: how the buyer pays, with the Stripe client secret — to
the buyer alone (SPEC §10); no snapshot, event or mirror row carries the secret."""

from __future__ import annotations

import faust
from faust.web import Request, Response, View

from escrow_stream.db import effects
from escrow_stream.db.effects import EffectState
from escrow_stream.db.pool import Database
from escrow_stream.web.auth import Role
from escrow_stream.web.gateway import Gateway, json_response
from escrow_stream.web.problems import Problem
from escrow_stream.web.schemas import PaymentInstructions


def register(app: faust.App, gateway: Gateway, database: Database) -> None:
    @app.page("/api/escrow/{escrow_id}/payment")
    class EscrowPayment(View):
        async def get(self, request: Request, escrow_id: str) -> Response:
            principal = await gateway.principal(request)
            pool = await database.pool()
            row = await effects.get(pool, effects.instructions_key(escrow_id))
            if row is None:
                raise Problem(404, "NOT_FOUND", f"no payment instructions for escrow {escrow_id}")
            buyer = row["event"]["escrow"]["buyerId"]
            if principal.role is not Role.USER or principal.sub != buyer:
                raise Problem(403, "NOT_AUTHORIZED", "only the buyer sees how to pay")
            state = EffectState(row["state"])
            payload = row["result_payload"] or {}
            body = PaymentInstructions(
                escrow_id=escrow_id,
                status=state.value,
                provider=row["provider"],
                provider_payment_id=payload.get("providerPaymentId"),
                client_secret=row["client_secret"],
                deposit_address=payload.get("depositAddress"),
                error_code=row["error_code"],
            )
            return json_response(self, body.model_dump(by_alias=True, exclude_none=True))
