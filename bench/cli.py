"""`python -m bench`: run the scenario suite against casbah and its peers, side by side.

By default it starts casbah, BuildGrid and buildbox-casd one after the other on
loopback (each alone, on a fresh data directory), runs the same scenarios against
each, prints a table with casbah's ratio to each peer and writes every figure to JSON.
With `--endpoint` it runs against already-running servers instead.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from bench.common import BenchError
from bench.context import Context
from bench.loadgen import LoadGenerator
from bench.report import BUSY_CORES, Outcome, TargetReport, fmt, print_table, to_json, write_json
from bench.scenarios import CORE_SCENARIOS, SCENARIOS, run_scenario
from bench.targets import (
    CASBAH_VARIANTS,
    MANAGED,
    Target,
    bench_home,
    buildgrid_bin,
    casd_bin,
    parse_endpoint,
    read_capabilities,
    start_target,
    stop_target,
    wait_ready,
)

DEFAULT_BATCH_LIMIT = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench",
        description="REAPI cache benchmark: casbah vs BuildGrid vs buildbox-casd (or any endpoint).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Core scenarios: " + ", ".join(CORE_SCENARIOS) + ". Extras (run when named): "
        + (", ".join(s for s in SCENARIOS if s not in CORE_SCENARIOS) or "none") + ".",
    )
    p.add_argument("--targets", default=None,
                   help=f"managed servers to start, comma-separated from {','.join([*MANAGED, *CASBAH_VARIANTS])} "
                        "(default: all three, or none when --endpoint is given)")
    p.add_argument("--endpoint", action="append", default=[], metavar="[LABEL=]grpc://HOST:PORT",
                   help="a running REAPI server to measure (repeatable)")
    p.add_argument("--instance", action="append", default=[],
                   help="instance name for the endpoints: once for all, or once per --endpoint (default '')")
    p.add_argument("--scenarios", default=",".join(CORE_SCENARIOS),
                   help="comma-separated scenarios, or 'all' (default: the core suite, "
                        f"{','.join(CORE_SCENARIOS)})")
    p.add_argument("--scale", type=float, default=1.0, help="multiply sizes and counts (e.g. 0.05 for a smoke run)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs of each scenario's timed phase, median reported (default 3; 2 for the long ones)")
    p.add_argument("--json", type=Path, default=None, help="where to write results (default: under the bench home)")
    p.add_argument("--casbah-args", default="",
                   help="extra arguments for `casbah serve`, one string: --casbah-args='--foo bar'")
    p.add_argument("--processes", type=int, default=4, help="load-generator processes for the bulk scenarios")
    p.add_argument("--clients", type=int, default=8, help="client processes in the concurrent scenario")
    p.add_argument("--batch-bytes", type=int, default=DEFAULT_BATCH_LIMIT,
                   help="batch size cap, further capped by the server's max_batch_total_size_bytes")
    p.add_argument("--baseline", default=None, help="target the ratios compare (default: casbah, else the first)")
    p.add_argument("--work-dir", type=Path, default=None, help="where managed servers keep data (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep servers' data directories and logs")
    p.add_argument("--no-install", action="store_true", help="fail instead of installing missing peers")
    p.add_argument("--install-only", action="store_true",
                   help="install the peers named by --targets (default both) into the bench home and exit")
    p.add_argument("--seed", type=int, default=None, help="dataset seed (default: random per run)")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error("--scale must be positive")
    if args.scenarios.strip() == "all":
        args.scenarios = ",".join(SCENARIOS)
    unknown = [s for s in _split(args.scenarios) if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    if args.targets is None:
        args.targets = "" if args.endpoint else ",".join(MANAGED)
    bad = [t for t in _split(args.targets) if t not in MANAGED and t not in CASBAH_VARIANTS]
    if bad:
        p.error(f"unknown targets {bad}; known: {', '.join([*MANAGED, *CASBAH_VARIANTS])} "
                "(use --endpoint for others)")
    if len(args.instance) > 1 and len(args.instance) != len(args.endpoint):
        p.error("give --instance once, or once per --endpoint")
    if not _split(args.targets) and not args.endpoint:
        p.error("nothing to measure: give --targets or --endpoint")
    return args


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.install_only:
        return _install_only(_split(args.targets))
    # Piped output (CI logs, tee) would otherwise be cut to 80 columns and wrap the table.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    scenarios = _split(args.scenarios)
    managed = _split(args.targets)
    instances = args.instance or [""]
    endpoints = [
        parse_endpoint(spec, instances[i] if len(instances) > 1 else instances[0])
        for i, spec in enumerate(args.endpoint)
    ]
    names = managed + [e.name for e in endpoints]
    if len(set(names)) != len(names):
        console.print("[red]target names must be unique (label endpoints with LABEL=grpc://...)[/red]")
        return 2
    baseline = args.baseline or ("casbah" if "casbah" in names else names[0])
    if baseline not in names:
        console.print(f"[red]--baseline {escape(baseline)} is not a target ({', '.join(names)})[/red]")
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    json_path = args.json or bench_home() / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    work_root = args.work_dir or Path(tempfile.mkdtemp(prefix="casbah-bench-"))
    work_root.mkdir(parents=True, exist_ok=True)
    arg_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    arg_record["seed"] = seed

    console.print(f"[bold]bench[/bold]: targets {', '.join(names)}; scenarios {', '.join(scenarios)}; "
                  f"scale {args.scale}; {os.cpu_count()} CPUs; results -> {json_path}")
    created: list[Path] = []  # servers' data directories and logs, removed at the end
    loadgen = LoadGenerator()
    reports: list[TargetReport] = []
    try:
        try:
            for name in names:
                endpoint = next((e for e in endpoints if e.name == name), None)
                report = _run_target(console, loadgen, name, endpoint, scenarios, args, seed, work_root, created)
                reports.append(report)
                write_json(json_path, to_json(reports, scenarios, baseline, arg_record))
        finally:
            loadgen.close()
        console.print()
        print_table(console, reports, scenarios, baseline)
        write_json(json_path, to_json(reports, scenarios, baseline, arg_record))
        console.print(f"results: {json_path}")
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    finally:
        # After the table: deleting ~100k blob files a server takes a minute or two on a busy disk.
        if not args.keep:
            _remove(work_root if args.work_dir is None else None, created, console)
    failed = any(r.error or any(o.error for o in r.outcomes.values()) for r in reports)
    return 1 if failed else 0


def _remove(root: Path | None, created: list[Path], console: Console) -> None:
    """Delete the servers' data: the whole temporary `root`, or only what this run created."""
    removing = time.monotonic()
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        for path in created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    console.print(f"[dim]servers' data removed ({time.monotonic() - removing:.1f}s)[/dim]")


def _install_only(targets: list[str]) -> int:
    """Install the peers ahead of time (e.g. in a setup step), so a timed run does not."""
    try:
        if "buildgrid" in targets:
            print(f"buildgrid: {buildgrid_bin(install=True)}")
        if "casd" in targets:
            print(f"buildbox-casd: {casd_bin(install=True)}")
    except BenchError as err:
        print(f"install failed: {err}", file=sys.stderr)
        return 1
    return 0


def _run_target(
    console: Console,
    loadgen: LoadGenerator,
    name: str,
    endpoint: Target | None,
    scenarios: list[str],
    args: argparse.Namespace,
    seed: int,
    work_root: Path,
    created: list[Path],
) -> TargetReport:
    """Start (if managed) one target, run every scenario against it, stop it."""
    target: Target | None = endpoint
    report = TargetReport(name=name, address=endpoint.address if endpoint else "",
                          instance=endpoint.instance if endpoint else "", managed=endpoint is None)
    begun = time.monotonic()
    try:
        if target is None:
            console.print(f"[bold cyan]== {name}[/bold cyan]: starting")
            extra = shlex.split(args.casbah_args) if name.startswith("casbah") else []
            target = start_target(name, work_root, casbah_args=extra, install=not args.no_install)
        else:
            wait_ready(target, timeout=30.0)  # an endpoint may still be starting
        report.address, report.instance, report.version = target.address, target.instance, target.version
        report.capabilities = read_capabilities(target)
        if "error" in report.capabilities:
            console.print(f"  [yellow]GetCapabilities failed ({escape(str(report.capabilities['error']))}): "
                          "assuming no batch limit[/yellow]")
        cap = int(report.capabilities.get("max_batch_total_size_bytes", 0) or 0)
        batch_limit = min(args.batch_bytes, cap) if cap > 0 else args.batch_bytes
        console.print(f"[bold cyan]== {name}[/bold cyan] at {target.address} (instance {target.instance!r}, "
                      f"up in {time.monotonic() - begun:.1f}s); "
                      f"max batch {cap or 'unlimited'} -> batches of {batch_limit} bytes")
        ctx = Context(target=target, loadgen=loadgen, scale=args.scale, repeat=args.repeat,
                      processes=args.processes, clients=args.clients, batch_limit=batch_limit, seed=seed)
        for scenario in scenarios:
            if not target.alive():
                report.outcomes[scenario] = Outcome(error=f"{name} is no longer running:\n{target.log_tail()}")
                continue
            started = time.monotonic()
            try:
                result = run_scenario(scenario, ctx)
            except BenchError as err:
                report.outcomes[scenario] = Outcome(error=str(err))
                console.print(f"  [bold red]{scenario}: FAILED[/bold red] {escape(str(err))}")
                if not target.alive():
                    console.print(f"  [red]{name} died; log tail:[/red]\n{escape(target.log_tail())}")
                continue
            report.outcomes[scenario] = Outcome(result=result)
            figures = "; ".join(
                f"{m.name} {fmt(m.median)} {m.unit} (runs {', '.join(fmt(v) for v in m.values)})"
                for m in result.metrics
            )
            busy = result.details.get("background_cores", 0.0)
            warning = (f"  [yellow]busy machine: other programs used {busy:.1f} cores meanwhile[/yellow]"
                       if busy >= BUSY_CORES and report.managed else "")
            console.print(f"  {scenario}: {figures}  [dim]{time.monotonic() - started:.1f}s[/dim]{warning}")
    except BenchError as err:
        report.error = str(err)
        console.print(f"[bold red]{name}:[/bold red] {escape(str(err))}")
    except KeyboardInterrupt:
        loadgen.close()  # workers may be mid-phase: stop them rather than wait for them
        raise
    finally:
        try:
            loadgen.reset()
        except BenchError:
            loadgen.close()
        if target is not None and target.process is not None:
            stopping = time.monotonic()
            # Data is removed after the last target: deleting ~100k blob files takes tens of
            # seconds of disk work on a busy machine, which must not overlap the next server.
            stop_target(target, remove=False)
            created.extend(p for p in (target.data_dir, target.log_path) if p is not None)
            console.print(f"  [dim]{name} stopped ({time.monotonic() - stopping:.1f}s)[/dim]")
            if args.keep:
                console.print(f"  kept {target.data_dir} (log {target.log_path})")
    return report


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
