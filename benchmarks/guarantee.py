"""What exactly_once costs: the real worker under each processing guarantee, in one run.

Run with the local stack up (``make run`` or ``make stack-up``)::

    .venv/bin/python -m benchmarks.guarantee [--escrows 500] [--rounds 3]
        [--commit-intervals-ms 2800,200] [--latency-seconds 15] [--latency-rate 100]

One ``escrow-stream worker`` per configuration, each a deployment of its own (topics, group,
data directory; ``tests.harness.Stack``), all up at once and idle but for the one measured:

- ``at_least_once`` at the default ``KAFKA_COMMIT_INTERVAL_MS``;
- ``exactly_once`` at each interval of ``--commit-intervals-ms``.

Per round, each configuration in turn takes a burst of ``--escrows`` interleaved lifecycles
(``benchmarks.pipeline``'s six commands each), produced as fast as the producer goes:
commands / (first event of the last command read - first send).  Events are read
``read_committed``, as the product's consumers read them, so under exactly_once an event
counts once its transaction has committed.  Then latency: an open-loop producer at
``--latency-rate`` commands/s for ``--latency-seconds``, send → first event read.  Ratios
are against at_least_once in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    Stopwatch,
    Table,
    activate_seller,
    bench_env,
    cleanup,
    command_line,
    ms,
    prepare,
    quantile,
    verify_kyc,
)
from benchmarks.pipeline import (
    BUYER,
    READY_WAIT_S,
    SELLER,
    STEPS,
    burst,
    interleaved,
    lifecycle,
    lifecycles,
    open_loop,
    records_of,
    staggered,
    warm_up,
)
from tests.harness import Stack, WorkerProcess, unique

DEFAULT_INTERVAL_MS = 2800


@dataclass
class Config:
    guarantee: str
    interval_ms: int
    stack: Stack
    worker: WorkerProcess
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.guarantee}, commit every {self.interval_ms} ms"


def start(guarantee: str, interval_ms: int, tmp: Path) -> Config:
    stack = Stack.create(
        tmp / f"{guarantee}-{interval_ms}",
        **bench_env(),
        KAFKA_PROCESSING_GUARANTEE=guarantee,
        KAFKA_COMMIT_INTERVAL_MS=str(interval_ms),
    )
    prepare(stack)
    activate_seller(stack, SELLER["id"])
    worker = stack.worker("bench").start()
    worker.wait_healthy(READY_WAIT_S)
    worker.wait_processing(READY_WAIT_S)
    verify_kyc(stack, worker, [BUYER["id"], SELLER["id"]])
    settings = stack.settings
    asyncio.run(
        warm_up(
            settings,
            settings.kafka_commands_topic,
            settings.kafka_events_topic,
            records_of(stack.secret(), lifecycle(unique("warm"))),
            isolation_level="read_committed",
        )
    )
    return Config(guarantee, interval_ms, stack, worker)


def measure(config: Config, escrows: int) -> float:
    settings = config.stack.settings
    records = records_of(config.stack.secret(), interleaved(lifecycles(escrows, "g")))
    rate, _ = asyncio.run(
        burst(
            settings,
            settings.kafka_commands_topic,
            settings.kafka_events_topic,
            records,
            isolation_level="read_committed",
        )
    )
    return rate


def latency(config: Config, per_s: float, seconds: float) -> list[float]:
    settings = config.stack.settings
    count = max(STEPS, int(per_s * seconds))
    lives = lifecycles((count + STEPS - 1) // STEPS, "glat")
    return asyncio.run(
        open_loop(
            settings,
            settings.kafka_commands_topic,
            settings.kafka_events_topic,
            records_of(config.stack.secret(), staggered(lives)),
            per_s,
            isolation_level="read_committed",
        )
    ).values


def run(argv: Sequence[str] | None = None) -> Table:
    parser = argparse.ArgumentParser(
        prog="benchmarks.guarantee", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--escrows", type=int, default=500, help="lifecycles per burst")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--commit-intervals-ms",
        default=f"{DEFAULT_INTERVAL_MS},200",
        help="exactly_once's KAFKA_COMMIT_INTERVAL_MS values to measure, comma-separated",
    )
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    parser.add_argument("--latency-rate", type=float, default=100.0, help="commands/s")
    args = parser.parse_args(argv)
    intervals = [int(v) for v in args.commit_intervals_ms.split(",") if v]
    clock = Stopwatch()
    table = Table(
        f"Processing guarantee: {args.escrows} escrows x {STEPS} commands, "
        f"{args.rounds} rounds; events read read_committed",
        command_line("benchmarks.guarantee", list(argv or [])),
        columns=("what", "figure", "ratio"),
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-guarantee-"))
    configs: list[Config] = []
    try:
        configs.append(start("at_least_once", DEFAULT_INTERVAL_MS, tmp))
        configs.extend(start("exactly_once", interval, tmp) for interval in intervals)
        for _ in range(args.rounds):
            for config in configs:
                config.rates.append(measure(config, args.escrows))
        for config in configs:
            config.latencies = latency(config, args.latency_rate, args.latency_seconds)
        for config in configs:
            assert config.worker.stop() == 0, config.worker.log_tail()
    except BaseException:
        for config in configs:
            print(f"--- {config.name}\n{config.worker.log_tail(3000)}", file=sys.stderr)
        raise
    finally:
        for config in configs:
            cleanup(config.stack)
        shutil.rmtree(tmp, ignore_errors=True)

    base = configs[0]
    base_rate = statistics.median(base.rates)
    base_p50 = quantile(base.latencies, 50)
    for config in configs:
        rate = statistics.median(config.rates)
        p50, p99 = quantile(config.latencies, 50), quantile(config.latencies, 99)
        table.add(
            f"{config.name}: commands/s (send → event read)",
            f"{rate:,.0f}",
            f"{rate / base_rate:.2f}x at_least_once",
        )
        table.add(
            f"{config.name}: latency p50 / p99 at {args.latency_rate:,.0f} commands/s",
            f"{ms(p50)} / {ms(p99)}",
            f"p50 {p50 / base_p50:.1f}x at_least_once",
        )
    table.notes = [
        "Per round, per configuration: "
        + "; ".join(f"{c.name} {', '.join(f'{r:,.0f}' for r in c.rates)}" for c in configs)
        + " commands/s.",
        "Every worker is the real one (KYC gating on, the PostgreSQL mirror and the timeout "
        "timer in the process), each on its own topics; the others are idle while one is "
        "measured. Under exactly_once an event is read once the transaction holding it "
        "commits, at the next offset commit after its command was handled.",
    ]
    table.seconds = clock.seconds
    return table


def main() -> None:
    print(run(sys.argv[1:]).markdown())


if __name__ == "__main__":
    main()
