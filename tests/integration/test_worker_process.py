"""The worker starts as a process, answers /health, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from escrow_stream.config import Settings
from tests.harness import free_port, stack_environ, unique

pytestmark = pytest.mark.integration

HEALTH_WAIT_S = 90
STOP_WAIT_S = 45


def _get_json(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status, json.loads(response.read())


def test_worker_health_and_clean_sigterm(stack_settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = stack_environ(
        PORT=str(port),
        WEB_HOST="127.0.0.1",
        KAFKA_GROUP_ID=unique("escrow-test-worker"),
        DATA_DIR=str(tmp_path / "data"),
        PATH="/usr/bin:/bin",
    )
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "escrow_stream.cli", "worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + HEALTH_WAIT_S
        body: dict[str, object] | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = _get_json(f"http://127.0.0.1:{port}/health")
                if status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-4000:]
        assert body is not None, "no /health answer within the bound"
        assert body["status"] == "ok"
        stamp = str(body["timestamp"])
        assert stamp.endswith("Z") and len(stamp) == len("2025-01-02T12:00:00.000Z")
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - moment).total_seconds()) < 60

        with pytest.raises(urllib.error.HTTPError) as err:
            _get_json(f"http://127.0.0.1:{port}/table/")
        err.value.close()
        assert err.value.code == 404

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_WAIT_S)
        text = (tmp_path / "worker.log").read_text()
        assert code == 0, text[-4000:]
        # nothing failed on the way down (the outbox relay once ran a batch on a closed pool)
        errors = [line for line in text.splitlines() if '"level": "error"' in line]
        assert errors == [], errors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
