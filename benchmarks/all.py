"""``make bench``: every benchmark in one run, then the Performance section from that run.

Run with the local stack up (``make run`` or ``make stack-up``)::

    .venv/bin/python -m benchmarks.all [--readme README.md] [--quick]

Runs ``benchmarks.domain``, ``benchmarks.pipeline``, ``benchmarks.http``,
``benchmarks.recovery`` and ``benchmarks.guarantee`` one after the other (each prepares its
own topics, migrations and KYC, and removes its topics), writes the section (date, machine,
this command, each table) to ``benchmarks/RESULTS.md``, prints it, and with ``--readme``
replaces the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in that file.
A benchmark that fails is named in the section and the command exits 1.  ``--quick`` runs
small sizes (a check that everything works, not figures to quote).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import domain, guarantee, http, pipeline, recovery
from benchmarks.common import Table, command_line, load_average, machine, now_utc
from benchmarks.report import MarkersMissing, replace_between_markers, section, write_results

Runner = Callable[[Sequence[str] | None], Table]


def plan(args: argparse.Namespace) -> list[tuple[str, Runner, list[str]]]:
    if args.quick:
        sizes = {
            "escrows": 200,
            "recovery": 5000,
            "requests": 300,
            "wait": 100,
            "domain": 500,
            "guarantee": 100,
        }
        latency_s, rounds = 5.0, 1
    else:
        sizes = {
            "escrows": args.escrows,
            "recovery": args.recovery_escrows,
            "requests": args.requests,
            "wait": args.wait_requests,
            "domain": args.domain_escrows,
            "guarantee": args.escrows // 2,
        }
        latency_s, rounds = args.latency_seconds, args.rounds
    profile = ["--profile", str(args.profile)] if args.profile else []
    everything: list[tuple[str, Runner, list[str]]] = [
        ("domain", domain.run, [str(sizes["domain"])]),
        (
            "pipeline",
            pipeline.run,
            [
                *("--escrows", str(sizes["escrows"]), "--rounds", str(rounds)),
                *("--latency-seconds", str(latency_s), *profile),
            ],
        ),
        (
            "http",
            http.run,
            ["--requests", str(sizes["requests"]), "--wait-requests", str(sizes["wait"])],
        ),
        ("recovery", recovery.run, ["--escrows", str(sizes["recovery"])]),
        (
            "guarantee",
            guarantee.run,
            [
                *("--escrows", str(sizes["guarantee"]), "--rounds", str(rounds)),
                *("--latency-seconds", str(latency_s / 2)),
            ],
        ),
    ]
    wanted = set(args.only.split(",")) if args.only else {name for name, _, _ in everything}
    return [step for step in everything if step[0] in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.all", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, help="also replace the section in this file")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check it works")
    parser.add_argument("--only", help="comma-separated: domain,pipeline,http,recovery,guarantee")
    parser.add_argument("--escrows", type=int, default=1000, help="pipeline lifecycles")
    parser.add_argument("--rounds", type=int, default=3, help="pipeline rounds")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=2000, help="HTTP requests per row")
    parser.add_argument("--wait-requests", type=int, default=500)
    parser.add_argument("--recovery-escrows", type=int, default=100_000)
    parser.add_argument("--domain-escrows", type=int, default=2000)
    parser.add_argument("--profile", type=Path, help="py-spy profiles of the pipeline's runs")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)

    date, load_before = now_utc(), load_average()
    tables: list[Table] = []
    failures: list[str] = []
    for name, runner, bench_argv in plan(args):
        print(
            f"benchmarks.all: running {command_line(f'benchmarks.{name}', bench_argv)}",
            file=sys.stderr,
            flush=True,
        )
        try:
            tables.append(runner(bench_argv))
        except Exception as exc:  # the others still run; the section says what failed
            traceback.print_exc()
            failures.append(f"`{command_line(f'benchmarks.{name}', bench_argv)}`: {exc!r}"[:500])
    text = section(
        tables,
        command_line("benchmarks.all", raw),
        date,
        machine(),
        load_before,
        load_average(),
        failures,
    )
    results = write_results(text)
    print(text)
    print(f"benchmarks.all: written to {results}", file=sys.stderr)
    if args.readme is not None:
        try:
            replace_between_markers(args.readme, text)
            print(f"benchmarks.all: section replaced in {args.readme}", file=sys.stderr)
        except MarkersMissing as exc:
            print(f"benchmarks.all: {exc}", file=sys.stderr)
            return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
