"""``GET /health``: liveness, in the deployment document's shape; 503 while stalled."""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View

from escrow_stream.clock import Clock, iso_millis
from escrow_stream.liveness import ProgressMonitor


def register(app: faust.App, clock: Clock, progress: ProgressMonitor) -> None:
    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            timestamp = iso_millis(clock())
            if progress.stalled:
                body: dict[str, Any] = {
                    "status": "stalled",
                    "timestamp": timestamp,
                    "stalledPartitions": sorted(progress.stalled_partitions),
                }
                return self.json(body, status=503)
            return self.json({"status": "ok", "timestamp": timestamp})
