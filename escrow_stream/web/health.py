"""``GET /health``: liveness, in the deployment document's shape."""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View

from escrow_stream.clock import Clock, iso_millis


def register(app: faust.App, clock: Clock) -> None:
    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            body: dict[str, Any] = {"status": "ok", "timestamp": iso_millis(clock())}
            return self.json(body)
