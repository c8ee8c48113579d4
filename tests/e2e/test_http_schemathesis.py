"""Schemathesis against /openapi.json on a live worker: no 5xx, responses match the schema."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from escrow_stream.config import Settings
from tests.e2e.test_http_reads import token
from tests.harness import Stack, WorkerProcess, deployment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXAMPLES_PER_OPERATION = 15
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings
) -> Iterator[tuple[Stack, WorkerProcess]]:
    with deployment(tmp_path_factory.mktemp("schemathesis")) as running:
        yield running


def test_generated_requests_get_no_5xx_and_documented_responses(
    worker: tuple[Stack, WorkerProcess], tmp_path: Path
) -> None:
    stack, process = worker
    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [
            str(st),
            "run",
            f"http://127.0.0.1:{process.port}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            str(EXAMPLES_PER_OPERATION),
            "--header",
            f"Authorization: Bearer {token(stack, 'schemathesis-user')}",
            "--request-timeout",
            "40",
            "--seed",
            "20261128",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    (tmp_path / "schemathesis.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
