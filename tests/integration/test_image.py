"""The container image, built and run here: ``scripts/image-local.sh smoke``.

No registry of images is reachable from these machines, so the script makes the base with
debootstrap (Debian bookworm, Python 3.11, as ``python:3.11-slim``), builds the Dockerfile on
it with podman, and runs the image against the local stack: ``db status``, ``topics create``,
the worker until ``/health`` and ``/ready`` answer 200, the image's own HEALTHCHECK, the user
it runs as, ``DATA_DIR`` written, and ``podman stop`` ending in exit code 0.  It installs
podman, runc and debootstrap with apt-get when they are missing (CI runs as root).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness import REPO, stack_environ

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


def test_the_image_builds_and_its_worker_runs_and_stops_cleanly() -> None:
    stack = stack_environ()
    env = {
        **os.environ,
        "TEST_KAFKA_BROKERS": stack["KAFKA_BROKERS"],
        "TEST_DATABASE_URL": stack["DATABASE_URL"],
        "TEST_REDIS_URL": stack["REDIS_URL"],
    }
    smoke = subprocess.run(
        ["scripts/image-local.sh", "smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    log = smoke.stdout + smoke.stderr
    assert smoke.returncode == 0, log[-4000:]
    assert "/health and /ready 200 after" in log, log[-4000:]
    assert "HEALTHCHECK passed; user escrow" in log, log[-4000:]
    assert "stopped cleanly (exit 0)" in log, log[-4000:]
