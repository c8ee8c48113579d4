"""Benchmark of the pure domain core: decide+evolve throughput and parse_command cost.

Run with ``.venv/bin/python -m benchmarks.domain [escrows]``; prints one table, one core.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from benchmarks.common import Stopwatch, Table, command_line
from escrow_stream.domain import Command, Escrow, decide, parse_command

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _envelope(
    escrow_id: str, n: int, command_type: str, actor: tuple[str, str], payload: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schemaVersion": 1,
        "commandId": f"{escrow_id}-{n}",
        "type": command_type,
        "escrowId": escrow_id,
        "actor": {"id": actor[0], "role": actor[1]},
        "issuedAt": "2025-01-01T00:00:00Z",
        "traceId": "trace",
    }
    if payload is not None:
        data["payload"] = payload
    return data


def escrow_mix(escrow_id: str) -> list[dict[str, Any]]:
    """One escrow's life: 9 commands, incl. one rejection, one duplicate and one no-op."""
    buyer, seller, system = ("b-1", "user"), ("s-1", "user"), ("payments", "system")
    create = {
        "offerId": "o-1",
        "contractId": "k-1",
        "buyerId": "b-1",
        "sellerId": "s-1",
        "rail": "STRIPE",
        "amount": "125000",
        "currency": "USD",
        "sellerFee": "2500",
    }
    funds = {
        "provider": "stripe",
        "providerPaymentId": "pi_1",
        "amount": "125000",
        "currency": "USD",
    }
    settle = {
        "settlementId": f"escrow-release:{escrow_id}:all:1",
        "provider": "stripe",
        "providerReference": "tr_1",
        "amount": "122500",
    }
    fund = _envelope(escrow_id, 3, "ConfirmFunds", system, funds)
    return [
        _envelope(escrow_id, 1, "CreateEscrow", buyer, create),
        _envelope(
            escrow_id,
            2,
            "RecordPaymentInstructions",
            system,
            {"provider": "stripe", "providerPaymentId": "pi_1"},
        ),
        fund,
        {**fund},  # duplicate (redelivery)
        _envelope(escrow_id, 4, "ReleaseFunds", buyer, None),  # rejected: not delivered
        _envelope(escrow_id, 5, "MarkDelivered", seller, {"note": "sent"}),
        _envelope(escrow_id, 6, "ReleaseFunds", buyer, None),
        _envelope(escrow_id, 7, "ConfirmSettlement", system, settle),
        _envelope(escrow_id, 8, "ConfirmFunds", system, funds),  # webhook replay: no-op
    ]


def run(argv: Sequence[str] | None = None) -> Table:
    """Run the benchmark over ``escrows`` escrow lives; the table of results."""
    parser = argparse.ArgumentParser(prog="benchmarks.domain", description=__doc__.splitlines()[0])
    parser.add_argument("escrows", type=int, nargs="?", default=2000)
    escrows = parser.parse_args(argv).escrows
    clock = Stopwatch()
    raw = [escrow_mix(f"esc-{i}") for i in range(escrows)]
    total = sum(len(r) for r in raw)

    start = time.perf_counter()
    parsed: list[list[Command]] = [[parse_command(c) for c in life] for life in raw]
    parse_s = time.perf_counter() - start

    now = T0
    events = rejections = duplicates = 0
    start = time.perf_counter()
    for life in parsed:
        state: Escrow | None = None
        for cmd in life:
            decision = decide(state, cmd, now)
            if decision.rejection is not None:
                rejections += 1
            elif decision.duplicate:
                duplicates += 1
            elif decision.events:
                events += len(decision.events)
                state = decision.events[-1].escrow
            now += timedelta(seconds=1)
    decide_s = time.perf_counter() - start

    table = Table(
        f"Domain core: {total:,} commands, one core",
        command_line("benchmarks.domain", list(argv or [])),
        columns=("what", "commands/s", "per command"),
    )
    table.add("decide+evolve", f"{total / decide_s:,.0f}", f"{decide_s / total * 1e6:.1f} µs")
    table.add("parse_command", f"{total / parse_s:,.0f}", f"{parse_s / total * 1e6:.1f} µs")
    table.notes = [
        f"{escrows:,} escrow lives of 9 commands: {events:,} events, {rejections:,} "
        f"rejections, {duplicates:,} duplicates; parse time / decide time "
        f"{parse_s / decide_s:.3f}."
    ]
    table.seconds = clock.seconds
    return table


def main() -> None:
    print(run(sys.argv[1:]).markdown())


if __name__ == "__main__":
    main()
