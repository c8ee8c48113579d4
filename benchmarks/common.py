"""What every benchmark shares: preparing the local stack (topics, migrations, KYC), the one
table each prints, the machine it ran on, and removing the topics a run made.

Every benchmark runs against the local stack (``make run`` or ``make stack-up``) in an
isolated deployment of its own (``tests.harness.Stack``: its own topics and consumer group)
and prepares what it needs itself, so it runs on a fresh machine after ``make run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from escrow_stream.config import Settings
from escrow_stream.db import migrate
from escrow_stream.kafka import client_kwargs
from escrow_stream.web.auth import Role, issue_token
from tests.harness import Stack, WorkerProcess, activate_payouts


@dataclass
class Table:
    """One benchmark's result: a title, the command that produced it, rows, notes."""

    title: str
    command: str
    columns: tuple[str, ...] = ("what", "figure")
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, *cells: str) -> None:
        self.rows.append(tuple(cells))

    def markdown(self) -> str:
        widths = [
            max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
            for i, c in enumerate(self.columns)
        ]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        out = [
            f"### {self.title}",
            "",
            f"`{self.command}` ({self.seconds:,.0f} s)",
            "",
            line(self.columns),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(r) for r in self.rows),
        ]
        if self.notes:
            out += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(out) + "\n"


def command_line(module: str, argv: Sequence[str]) -> str:
    """The exact command that reproduces a run, as typed in the repository's root."""
    return shlex.join([".venv/bin/python", "-m", module, *argv])


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "n/a"


def ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1000:.3f} ms"
    return f"{seconds * 1000:,.1f} ms"


def quantile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile (1..99) of ``values``; the value itself when there is one."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# -- the machine ------------------------------------------------------------------------


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine() -> str:
    """Cores, memory, CPU model and kernel, from ``nproc``, ``free -g``, ``lscpu``, ``uname -r``."""
    cores = _run("nproc") or str(os.cpu_count())
    memory = next(
        (line.split()[1] for line in _run("free", "-g").splitlines() if line.startswith("Mem:")),
        "?",
    )
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in _run("lscpu").splitlines()
            if line.startswith("Model name")
        ),
        platform.processor() or "?",
    )
    kernel = _run("uname", "-r") or platform.release()
    python = sys.version.split()[0]
    return f"{cores} cores ({model}), {memory} GiB RAM, Linux {kernel}, Python {python}"


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (``uptime``): the machine may be shared."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- preparing the stack ----------------------------------------------------------------


def prepare(stack: Stack) -> None:
    """The deployment's topics and the database schema (migrations are idempotent)."""
    migrate.upgrade(stack.settings)
    asyncio.run(stack.create_topics())


def admin_bearer(settings: Settings) -> dict[str, str]:
    token = issue_token(
        settings.jwt_secret.get_secret_value(),
        "bench-admin",
        Role.ADMIN,
        datetime.now(UTC),
        timedelta(hours=2),
    )
    return {"Authorization": f"Bearer {token}"}


def verify_kyc(stack: Stack, worker: WorkerProcess, users: Iterable[str]) -> None:
    """Set each user's KYC status to VERIFIED through the worker's KYC endpoint
    (``PUT /api/kyc/{user_id}``, as an admin), then read it back."""
    headers = {**admin_bearer(stack.settings), "Content-Type": "application/json"}
    for user in users:
        request = urllib.request.Request(
            f"{worker.base_url}/api/kyc/{user}",
            data=json.dumps({"status": "VERIFIED"}).encode(),
            headers=headers,
            method="PUT",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, response.read()
        read = urllib.request.Request(f"{worker.base_url}/api/kyc/{user}", headers=headers)
        with urllib.request.urlopen(read, timeout=10) as response:
            status = json.loads(response.read())["status"]
        assert status == "VERIFIED", f"KYC of {user}: {status}"


def activate_seller(stack: Stack, seller: str) -> None:
    """The seller's ACTIVE payout accounts, which a release needs (test set-up helper)."""
    asyncio.run(activate_payouts(stack.settings, seller))


def bench_env() -> dict[str, str]:
    """Production's defaults where ``tests.harness.Stack`` changes them for the tests: KYC
    gating on, no default platform fee (the bench lifecycles settle the whole amount)."""
    return {"FEATURE_KYC_GATING": "true", "ESCROW_FEE_BPS": "0"}


# -- cleaning up ------------------------------------------------------------------------


async def delete_topics(settings: Settings, prefixes: Iterable[str]) -> int:
    """Delete the topics whose names start with one of ``prefixes`` (a run's own)."""
    wanted = tuple(prefixes)
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        names = sorted(t for t in await admin.list_topics() if t.startswith(wanted))
        for start in range(0, len(names), 100):
            await admin.delete_topics(names[start : start + 100])
        return len(names)
    finally:
        await admin.close()


def stack_prefixes(stack: Stack) -> list[str]:
    """A Stack's topics (``t-….commands`` …) and Faust's (``escrow-t-…-escrows-changelog``)."""
    group = stack.settings.kafka_group_id
    run = group.removeprefix("escrow-")
    return [f"{run}.", f"{group}-"]


def cleanup(stack: Stack, *extra_prefixes: str) -> None:
    stack.stop_all()
    try:
        asyncio.run(delete_topics(stack.settings, [*stack_prefixes(stack), *extra_prefixes]))
    except Exception as exc:  # a benchmark's result stands; say what was left behind
        print(f"note: could not delete this run's topics: {exc}", file=sys.stderr)


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


# -- where the CPU went ------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds: the whole machine (busy and all) and some processes."""

    machine_busy: float
    machine_all: float
    processes: dict[str, float]

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSample:
        ticks = os.sysconf("SC_CLK_TCK")
        # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ...
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        idle = fields[3] + fields[4]
        processes = {}
        for name, pid in pids.items():
            # /proc/PID/stat: utime and stime are fields 14 and 15, after "(comm)"
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            processes[name] = (int(stat[11]) + int(stat[12])) / ticks
        return cls((sum(fields) - idle) / ticks, sum(fields) / ticks, processes)

    def shares(self, later: CpuSample) -> dict[str, float]:
        """Between the two samples, each process's CPU and the machine's busy CPU, in cores."""
        wall_cores = later.machine_all - self.machine_all  # core-seconds elapsed
        cores = os.cpu_count() or 1
        out = {
            name: (later.processes[name] - self.processes[name]) / wall_cores * cores
            for name in self.processes
        }
        out["machine"] = (later.machine_busy - self.machine_busy) / wall_cores * cores
        return out


def broker_pid() -> int | None:
    """The local broker's pid, if it runs here: ``scripts/stack.sh`` writes it to
    ``kafka.pid``, or ``kafka-<version>.pid`` for a KAFKA_VERSION other than its default."""
    stack_dir = Path(os.environ.get("STACK_DIR", Path(__file__).parents[1] / ".stack"))
    for pid_file in sorted(stack_dir.glob("kafka*.pid")):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{pid}").exists():
            return pid
    return None


def stack_pids(worker: WorkerProcess) -> dict[str, int]:
    """The processes whose CPU a benchmark reports: the worker, this process (the load and
    the readers) and, when it runs here, the broker."""
    assert worker.proc is not None
    pids = {"worker": worker.proc.pid, "benchmark (load and reader)": os.getpid()}
    if (broker := broker_pid()) is not None:
        pids["broker"] = broker
    return pids


def cpu_note(what: str, used: dict[str, float]) -> str:
    """One note: the CPU each part used during ``what``, in cores."""
    return (
        f"CPU during {what}, in cores (of {os.cpu_count()}): "
        + ", ".join(f"{name} {cores:.2f}" for name, cores in used.items())
        + "."
    )
