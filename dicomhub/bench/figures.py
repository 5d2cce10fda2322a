"""Pure arithmetic and layout for the benchmark: percentiles, schedules, the table."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks, as
    numpy's default. Raises ValueError on an empty sequence or q outside 0-100."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of durations in seconds, as milliseconds rounded to 0.1."""
    return {"p50_ms": round(percentile(seconds, 50) * 1000, 1),
            "p99_ms": round(percentile(seconds, 99) * 1000, 1),
            "max_ms": round(max(seconds) * 1000, 1)}


def schedule(start: float, rate: float, count: int) -> list[float]:
    """When each of `count` events is due at `rate` per second from `start`: fixed
    times, so a late event does not push every later one back."""
    return [start + i / rate for i in range(count)]


def epoch(text: str) -> float:
    """An ISO 8601 time such as 2026-01-02T03:04:05.678Z as epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal for one figure: `holds(value)` says whether it is met."""

    text: str
    holds: Callable[[float], bool]


TARGETS: dict[tuple[str, str], Target] = {
    ("e2e", "ratio_to_reference"): Target(">= 1.0", lambda v: v >= 1.0),
    ("live", "p99_ms"): Target("< 250", lambda v: v < 250),
    ("fanout", "lost_messages"): Target("0", lambda v: v == 0),
    ("fanout", "delivery_p99_ms"): Target("< 500", lambda v: v < 500),
    ("fanout", "ingest_ratio_to_e2e"): Target(">= 0.9", lambda v: v >= 0.9),
    ("reads", "series_p99_ms"): Target("< 20", lambda v: v < 20),
    ("reads", "series_by_patient_p99_ms"): Target("< 20", lambda v: v < 20),
    ("watcher", "main_peak_rss_mib"): Target("< 200", lambda v: v < 200),
    ("cstore", "ratio_to_orthanc"): Target(">= 1.5", lambda v: v >= 1.5),
}
# Shown in the target column of figures that have no target but need a word.
NOTES: dict[tuple[str, str], str] = {
    ("live", "settle_s"): "(not in latency)",
}


@dataclass(frozen=True)
class Row:
    step: str
    figure: str
    value: str
    target: str = ""
    verdict: str = ""  # "pass", "fail" or "" when there is no target


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def rows(steps: Mapping[str, Mapping[str, Any]]) -> list[Row]:
    """One row per figure of every step, with its target and verdict where one exists;
    a failed or skipped step gets one row saying so (the error goes below the table)."""
    out: list[Row] = []
    for step, result in steps.items():
        status = result.get("status", "?")
        if status != "ok":
            out.append(Row(step, status, "-", "", "fail" if status == "failed" else ""))
            continue
        for figure, value in result.get("figures", {}).items():
            target = TARGETS.get((step, figure))
            verdict = ""
            if target is not None and isinstance(value, (int, float)):
                verdict = "pass" if target.holds(value) else "fail"
            text = target.text if target else NOTES.get((step, figure), "")
            out.append(Row(step, figure, _shown(value), text, verdict))
    return out


def verdicts(steps: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every target as JSON: its figure, value, goal and whether it was met
    (None when the step did not produce the figure)."""
    out: list[dict[str, Any]] = []
    for (step, figure), target in TARGETS.items():
        value = steps.get(step, {}).get("figures", {}).get(figure)
        met = target.holds(value) if isinstance(value, (int, float)) else None
        out.append({"step": step, "figure": figure, "value": value, "target": target.text,
                    "pass": met})
    return out


def render(table: Sequence[Row]) -> str:
    """The rows as a plain-text table with a header, columns padded to fit."""
    header = Row("step", "figure", "value", "target", "result")
    cells = [(r.step, r.figure, r.value, r.target, r.verdict) for r in (header, *table)]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    lines = []
    for n, row in enumerate(cells):
        # Numbers read best right-aligned; the words around them left-aligned.
        parts = [row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                 row[2].rjust(widths[2]), row[3].ljust(widths[3]), row[4]]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
