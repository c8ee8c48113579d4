"""What the image runs: the wheel, built from the repository and installed with its own
dependency metadata into a fresh virtualenv away from the source tree.

1. The wheel is built from a copy of exactly what the Dockerfile's build stage gets
   (``pyproject.toml``, ``README.md``, ``escrow_stream/``: the ``.dockerignore`` allow-list).
2. It holds every module of the package, the Alembic migrations (``migrations/`` and
   ``versions/`` have no ``__init__.py``: only package discovery keeps them) and the
   ``escrow-stream`` console script.
3. A fresh venv gets the wheel and the dependencies its metadata names (never ``--no-deps``,
   which would hide a dependency missing from the metadata), from a wheelhouse kept between
   runs that ``pip download`` fills from the index when it lacks one.
4. From a directory outside the repository, the venv's ``escrow-stream`` reads the migration
   head, creates the deployment's topics, and runs ``worker`` until ``/health`` and ``/ready``
   answer 200 (and ``/openapi.json``, built in code); then SIGTERM, and it must exit 0.

No file of the package other than Python is needed at run time (the OpenAPI document and the
JSON Schemas are built in code); ``migrations/script.py.mako`` is left out of the wheel, and
only ``alembic revision`` (development, in the source tree) reads it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from escrow_stream.config import Settings
from escrow_stream.db import migrate
from tests.harness import HEALTH_WAIT_S, REPO, Stack, WorkerProcess

pytestmark = pytest.mark.integration

PACKAGE = "escrow_stream"
#: What the Dockerfile's build stage copies (the .dockerignore allow-list).
BUILD_CONTEXT = ("pyproject.toml", "README.md", PACKAGE)
PIP_TIMEOUT_S = 600
#: The dependencies' wheels, kept between runs: pip's own HTTP cache stays empty where the
#: index's answers may not be stored, and resolving against the index takes half a minute.
WHEELHOUSE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "escrow-stream"
    / "test-wheelhouse"
)
CLI_TIMEOUT_S = 120


def _run(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _source_modules() -> set[str]:
    root = REPO / PACKAGE
    return {
        path.relative_to(REPO).as_posix()
        for path in root.rglob("*.py")
        if "__pycache__" not in path.parts
    }


class InstalledWorker(WorkerProcess):
    """The harness's worker, started as the venv's console script from ``cwd``."""

    def __init__(self, script: Path, cwd: Path, like: WorkerProcess) -> None:
        super().__init__(like.name, like.env, like.log_path)
        self.script = script
        self.cwd = cwd

    def start(self) -> InstalledWorker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.script), "worker"],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_answering(self, path: str, timeout_s: float = HEALTH_WAIT_S) -> dict[str, object]:
        def answer() -> dict[str, object] | None:
            status, body = self.get(path)
            return body if status == 200 else None

        return self._wait_for(f"{path} to answer 200", answer, timeout_s)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built (with pip's build isolation) from a copy of the context."""
    context = tmp_path_factory.mktemp("context")
    for name in BUILD_CONTEXT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, context / name)
    dist = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), str(context)],
        cwd=context,
        timeout=PIP_TIMEOUT_S,
    )
    print(f"\nwheel built in {time.monotonic() - started:.1f}s")
    (built,) = dist.glob("escrow_stream-*.whl")
    return built


def _install(python: Path, wheel: Path) -> None:
    """The wheel and its dependencies into the venv of ``python``, resolved by pip from the
    wheel's metadata: from the wheelhouse alone when it has them all, else after adding what
    the index has (the first run, a new dependency)."""
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    offline = [*install, "--no-compile", "--no-index", "--find-links", str(WHEELHOUSE), str(wheel)]
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    if subprocess.run(offline, capture_output=True, timeout=PIP_TIMEOUT_S).returncode == 0:
        return
    fetch = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE)]
    _run([*fetch, str(wheel)], cwd=WHEELHOUSE, timeout=PIP_TIMEOUT_S)
    for ours in WHEELHOUSE.glob("escrow_stream-*.whl"):  # the wheel under test is given
        ours.unlink()
    _run(offline, cwd=WHEELHOUSE, timeout=PIP_TIMEOUT_S)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no pip of its own: the test's pip installs into it) holding the wheel
    and the dependencies its metadata names."""
    root = tmp_path_factory.mktemp("venv")
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root)
    _install(root / "bin" / "python", wheel)
    print(f"\nvenv with the wheel and its dependencies in {time.monotonic() - started:.1f}s")
    return root


def test_wheel_holds_the_package_migrations_and_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()

    missing = _source_modules() - names
    assert not missing, f"modules left out of the wheel: {sorted(missing)}"
    versions = {n for n in names if n.startswith(f"{PACKAGE}/db/migrations/versions/")}
    assert len(versions) >= 1
    assert f"{PACKAGE}/db/migrations/env.py" in names
    assert not {n for n in names if "__pycache__" in n or n.endswith(".pyc")}

    assert re.search(r"^escrow-stream = escrow_stream\.cli:main$", entry_points, re.M)
    # Every dependency of pyproject.toml is in the wheel's metadata (extras included).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()}
    for dependency in project["dependencies"]:
        name = re.split(r"[\[<>=!~; ]", dependency, maxsplit=1)[0]
        assert any(r.lower().startswith(name.lower()) for r in required), dependency
    assert f"Version: {project['version']}" in metadata


def test_installed_wheel_runs_the_worker(
    venv: Path, stack_settings: Settings, tmp_path: Path
) -> None:
    outside = tmp_path / "cwd"
    outside.mkdir()
    assert not outside.resolve().is_relative_to(REPO)
    python, script = venv / "bin" / "python", venv / "bin" / "escrow-stream"

    # The package comes from the venv, not from the repository.
    found = _run(
        [str(python), "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
        cwd=outside,
        env={"PATH": "/usr/bin:/bin"},
    )
    location = Path(found.stdout.strip()).resolve()
    assert location.is_relative_to(venv.resolve()), location
    assert not location.is_relative_to(REPO), location

    stack = Stack.create(tmp_path / "data")
    env = {**stack.env, "PATH": "/usr/bin:/bin"}
    # Alembic finds the installed migrations: their head is the source tree's.
    head = ScriptDirectory.from_config(migrate.alembic_config("unused")).get_current_head()
    status = _run([str(script), "db", "status"], cwd=outside, env=env, timeout=CLI_TIMEOUT_S)
    assert f"head: {head} (head)" in status.stdout, status.stdout
    topics = _run([str(script), "topics", "create"], cwd=outside, env=env, timeout=CLI_TIMEOUT_S)
    assert stack.settings.kafka_commands_topic in topics.stdout, topics.stdout

    worker = InstalledWorker(script, outside, stack.worker("wheel"))
    started = time.monotonic()
    worker.start()
    try:
        assert worker.wait_answering("/health")["status"] == "ok"
        ready = worker.wait_answering("/ready")
        assert ready["status"] == "ready", ready
        print(f"\ninstalled worker healthy and ready in {time.monotonic() - started:.1f}s")
        paths = worker.wait_answering("/openapi.json")["paths"]
        assert isinstance(paths, dict) and "/ready" in paths, paths
    finally:
        code = worker.stop()
    assert code == 0, worker.log_tail()
