"""Reporting: the side-by-side table and the JSON file.

Ratios are always oriented so that > 1 means the baseline (casbah, by default) is
better: baseline/peer for throughputs, peer/baseline for latencies.  Absolute figures
drift with the machine's load; ratios measured in the same run drift much less.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.context import Metric, ScenarioResult

# Other programs using this many cores during a scenario make its figures suspect.
BUSY_CORES = 0.25

# Reference medians from /work/shared/peers.md (BuildGrid 0.9.1 disk, buildbox-casd), same
# kind of machine: shown beside our own peer figures to catch a client-bound benchmark.
REFERENCE: dict[tuple[str, str, str], tuple[float, float]] = {
    ("fmb", "FindMissingBlobs", "digests/s"): (119_000, 266_000),
    ("batch_update", "BatchUpdateBlobs", "blobs/s"): (10_700, 10_600),
    ("batch_read", "BatchReadBlobs", "blobs/s"): (25_500, 49_000),
    ("bytestream_write", "ByteStream write", "MB/s"): (378, 441),
    ("bytestream_read", "ByteStream read", "MB/s"): (1000, 730),
    ("bytestream_small", "ByteStream small write", "writes/s"): (845, 815),
    ("bytestream_small", "ByteStream small read", "reads/s"): (1070, 1780),
}


@dataclass
class Outcome:
    """One scenario on one target: a result or an error."""

    result: ScenarioResult | None = None
    error: str | None = None


@dataclass
class TargetReport:
    name: str
    address: str
    instance: str
    version: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    error: str | None = None
    # Only for servers we started can "other programs' CPU" exclude the server itself.
    managed: bool = True


def ratio(base: Metric, other: Metric) -> float | None:
    """How much better the baseline is than `other` on this metric (> 1 = better)."""
    b, o = base.median, other.median
    if not (math.isfinite(b) and math.isfinite(o)) or b <= 0 or o <= 0:
        return None
    return b / o if base.higher_is_better else o / b


def fmt(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    if abs(value) >= 100_000:
        return f"{value / 1000:,.0f}k"
    if abs(value) >= 10_000:
        return f"{value / 1000:,.1f}k"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _metric_rows(reports: list[TargetReport], scenarios: list[str]) -> list[tuple[str, str, str]]:
    """(scenario, metric name, unit) in scenario order, as any target produced them."""
    rows: list[tuple[str, str, str]] = []
    for scenario in scenarios:
        for report in reports:
            outcome = report.outcomes.get(scenario)
            if outcome and outcome.result:
                for m in outcome.result.metrics:
                    key = (scenario, m.name, m.unit)
                    if key not in rows:
                        rows.append(key)
    return rows


def _find(report: TargetReport, scenario: str, name: str, unit: str) -> Metric | None:
    outcome = report.outcomes.get(scenario)
    if outcome is None or outcome.result is None:
        return None
    for m in outcome.result.metrics:
        if m.name == name and m.unit == unit:
            return m
    return None


def print_table(console: Console, reports: list[TargetReport], scenarios: list[str], baseline: str) -> None:
    base = next((r for r in reports if r.name == baseline), None)
    others = [r for r in reports if r is not base]
    table = Table(title="REAPI benchmark (medians; ratio > 1 means " + baseline + " is better)")
    table.add_column("scenario")
    table.add_column("metric")
    for r in reports:
        table.add_column(r.name, justify="right")
    if base is not None:
        for r in others:
            table.add_column(f"{baseline} vs {r.name}", justify="right")
    show_ref = any(r.name in ("buildgrid", "casd") for r in reports)
    if show_ref:
        table.add_column("peers.md bgd / casd", justify="right", style="dim")
    any_busy = False
    for scenario, name, unit in _metric_rows(reports, scenarios):
        cells = [scenario, escape(f"{name} [{unit}]")]
        for r in reports:
            m = _find(r, scenario, name, unit)
            outcome = r.outcomes.get(scenario)
            if m is not None:
                busy = r.managed and outcome is not None and outcome.result is not None and \
                    outcome.result.details.get("background_cores", 0.0) >= BUSY_CORES
                cells.append(fmt(m.median) + (" [yellow]*[/yellow]" if busy else ""))
                any_busy = any_busy or busy
            elif outcome is not None and outcome.error:
                cells.append("[red]FAILED[/red]")
            else:
                cells.append("-")
        if base is not None:
            bm = _find(base, scenario, name, unit)
            for r in others:
                om = _find(r, scenario, name, unit)
                x = ratio(bm, om) if bm and om else None
                if x is None:
                    cells.append("-")
                else:
                    color = "green" if x >= 1.0 else "red"
                    cells.append(f"[{color}]{x:.2f}x[/{color}]")
        if show_ref:
            ref = REFERENCE.get((scenario, name, unit))
            cells.append(f"{fmt(ref[0])} / {fmt(ref[1])}" if ref else "")
        table.add_row(*cells)
    console.print(table)
    if any_busy:
        console.print(f"[yellow]*[/yellow] other programs used >= {BUSY_CORES} cores during that scenario "
                      "(see background_cores in the JSON): treat the figure with suspicion")
    for r in reports:
        if r.error:
            console.print(f"[bold red]{r.name}:[/bold red] {escape(r.error)}")
        for scenario, outcome in r.outcomes.items():
            if outcome.error:
                console.print(f"[bold red]{r.name} / {scenario} FAILED:[/bold red] {escape(outcome.error)}")


def to_json(reports: list[TargetReport], scenarios: list[str], baseline: str, args: dict[str, Any]) -> dict[str, Any]:
    base = next((r for r in reports if r.name == baseline), None)
    out: dict[str, Any] = {
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "args": args,
            "baseline": baseline,
        },
        "targets": {},
        "ratios": {},
    }
    for r in reports:
        scen: dict[str, Any] = {}
        for name, outcome in r.outcomes.items():
            if outcome.result is None:
                scen[name] = {"ok": False, "error": outcome.error}
                continue
            scen[name] = {
                "ok": True,
                "metrics": [
                    {"name": m.name, "unit": m.unit, "median": m.median, "values": m.values,
                     "higher_is_better": m.higher_is_better}
                    for m in outcome.result.metrics
                ],
                "details": outcome.result.details,
            }
        out["targets"][r.name] = {
            "address": r.address, "instance": r.instance, "version": r.version, "managed": r.managed,
            "capabilities": r.capabilities, "error": r.error, "scenarios": scen,
        }
    if base is not None:
        for r in reports:
            if r is base:
                continue
            rows = {}
            for scenario, name, unit in _metric_rows(reports, scenarios):
                bm, om = _find(base, scenario, name, unit), _find(r, scenario, name, unit)
                rows[f"{scenario}: {name} [{unit}]"] = ratio(bm, om) if bm and om else None
            out["ratios"][f"{baseline}_vs_{r.name}"] = rows
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
