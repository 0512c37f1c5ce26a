"""The soak job's report: `summary.json`, `summary.md` and `soak.png` (RSS and open files)."""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

from bench.soak_load import Stats

#: Statuses that mean the server failed rather than refused: never acceptable.
SERVER_FAULTS = ("INTERNAL", "UNKNOWN")


def _flat(samples: list, column: int, skip: float = 60.0) -> dict[str, float]:
    """First, last, min and max of a column after the warm-up (`skip` seconds)."""
    values = [s[column] for s in samples if s[0] >= skip] or [s[column] for s in samples]
    if not values:
        return {}
    return {"first": round(values[0], 1), "last": round(values[-1], 1), "min": round(min(values), 1),
            "max": round(max(values), 1)}


def write_report(out: Path, args: argparse.Namespace, stats: Stats, samples: list, events: list, checks: list,
                 server_log: Path) -> dict:
    by_status: collections.Counter = collections.Counter()
    by_op: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (op, code), n in stats.outcomes.items():
        by_status[code] += n
        by_op[op][code] = n
    excused: collections.Counter = collections.Counter()
    for (_, code), n in stats.excused.items():
        excused[code] += n
    lost = sum(sum(c["lost"].values()) for c in checks)
    log_text = server_log.read_text(errors="replace") if server_log.exists() else ""
    summary = {
        "minutes": args.minutes,
        "requests": sum(stats.outcomes.values()) + sum(stats.excused.values()),
        "by_status": dict(by_status),
        "during_restarts": dict(excused),
        "by_operation": by_op,
        "cancelled_by_clients": stats.cancelled_by_us,
        "internal_or_unknown": sum(by_status[c] + excused[c] for c in SERVER_FAULTS),
        "lost_writes": lost,
        "checks": checks,
        "events": [(round(t), what) for t, what in events],
        "rss_mib": _flat(samples, 1),
        "open_files": _flat(samples, 2),
        "server_tracebacks": log_text.count("Traceback"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _markdown(out, summary)
    _plot(out / "soak.png", samples, events)
    return summary


def _markdown(out: Path, s: dict) -> None:
    lines = [f"# Soak: {s['minutes']} minutes", "",
             f"- requests: {s['requests']} ({s['cancelled_by_clients']} more cancelled mid-stream by the clients)",
             f"- by status (server up): {s['by_status']}",
             f"- during restarts (server killed): {s['during_restarts']}",
             f"- INTERNAL/UNKNOWN: {s['internal_or_unknown']}; tracebacks in the server log: {s['server_tracebacks']}",
             f"- acknowledged writes lost: {s['lost_writes']} over {len(s['checks'])} checks "
             f"(last: {s['checks'][-1] if s['checks'] else '-'})",
             f"- RSS MiB after warm-up: {s['rss_mib']}", f"- open files after warm-up: {s['open_files']}",
             f"- faults: {s['events']}", "", "![RSS and open files](soak.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))


def _plot(path: Path, samples: list, events: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss_ax, fd_ax, rate_ax) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    t = [s[0] / 60 for s in samples]
    rss_ax.plot(t, [s[1] for s in samples])
    rss_ax.set_ylabel("server RSS (MiB)")
    fd_ax.plot(t, [s[2] for s in samples], color="tab:orange")
    fd_ax.set_ylabel("open files")
    rates = [0.0] + [(b[3] - a[3]) / max(b[0] - a[0], 1e-3) for a, b in itertools.pairwise(samples)]
    rate_ax.plot(t, rates, color="tab:green")
    rate_ax.set_ylabel("requests/s")
    rate_ax.set_xlabel("minutes")
    for when, what in events:
        for ax in (rss_ax, fd_ax, rate_ax):
            ax.axvline(when / 60, color="red" if what == "SIGKILL" else "grey", alpha=0.3, linewidth=1)
    fig.suptitle("casbah soak: red = SIGKILL + restart, grey = disk full / freed")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
