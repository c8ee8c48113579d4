"""The README's Performance section, written from one run of the benchmarks: the date, the
machine, the exact command, and each benchmark's table.

``benchmarks.all`` writes it to ``benchmarks/RESULTS.md`` and, with ``--readme README.md``,
between the markers ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` of that file
(:func:`replace_between_markers`); the text outside the markers is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import Table

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
RESULTS = Path(__file__).with_name("RESULTS.md")


class MarkersMissing(Exception):
    """The file has no ``<!-- bench:begin -->`` … ``<!-- bench:end -->`` pair."""


def section(
    tables: Sequence[Table],
    command: str,
    date: str,
    machine: str,
    load_before: str,
    load_after: str,
    failures: Sequence[str] = (),
) -> str:
    """The section's text (Markdown, no heading of its own)."""
    lines = [
        f"Measured {date} with `{command}` (`make bench`), one run, on {machine}.",
        f"Load average (`uptime`: 1, 5, 15 min) {load_before} before, {load_after} after: "
        "the benchmarks share the cores with the broker and the databases, and with "
        "anything else running on the machine.",
        "",
    ]
    for failure in failures:
        lines += [f"**Failed:** {failure}", ""]
    for table in tables:
        lines.append(table.markdown())
    return "\n".join(lines).rstrip() + "\n"


def replace_between_markers(path: Path, text: str) -> None:
    """Replace what lies between the first ``BEGIN`` and the next ``END`` in ``path`` with
    ``text`` (the markers stay, each on its own line); :class:`MarkersMissing` otherwise."""
    content = path.read_text()
    start = content.find(BEGIN)
    end = content.find(END, start + len(BEGIN)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise MarkersMissing(f"{path}: no {BEGIN} … {END} pair to replace")
    body = "\n" + text.strip("\n") + "\n"
    path.write_text(content[: start + len(BEGIN)] + body + content[end:])


def write_results(text: str, path: Path = RESULTS) -> Path:
    """``benchmarks/RESULTS.md``: the section between the markers, under a heading."""
    path.write_text(f"# Benchmark results\n\n{BEGIN}\n{text.strip(chr(10))}\n{END}\n")
    return path
