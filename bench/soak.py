"""The soak job: `scripts/soak --minutes 30`.

Runs a real `casbah serve` (disk storage and the SQLite asset index, on a tmpfs of
`--disk-size` when run as root) under a mixed Bazel-shaped load (`bench.soak_load`)
for a bounded time, with faults injected on a schedule:

- clients cancelling mid-stream (part of the load: large uploads and reads given up);
- the disk filling up and emptying again (a filler file, held `--full-for` seconds);
- SIGKILL and restart of the server every `--kill-every` seconds, after which every
  write the server acknowledged so far is read back and checked.

It samples the server's RSS and open files, and writes to `--out`: `summary.json`,
`summary.md` and `soak.png` (RSS and open files over time).  Exit status 1 when any
acknowledged write was lost or any call got INTERNAL/UNKNOWN.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.soak_load import Ledger, Load, Stats, verify
from bench.soak_report import write_report

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "casbah", "serve", "--listen", self.address, "--data-dir", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(self.address) as channel:
                    grpc.channel_ready_future(channel).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"casbah exited with {self.proc.returncode}; see {self.log}") from None
        raise RuntimeError(f"casbah did not start; see {self.log}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def sample(self) -> tuple[float, int] | None:
        """(RSS in MiB, open files), or None while the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            return rss / 1024, len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except (OSError, StopIteration):
            return None


def _mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(path: Path) -> None:
    """Write `path` until the filesystem is full (big pieces, then small ones for the last bytes)."""
    with open(path, "wb", buffering=0) as f:
        for piece in (1 << 20, 4096):
            try:
                while True:
                    f.write(b"\0" * piece)
            except OSError:
                pass


async def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    disk = Path(tempfile.mkdtemp(prefix="casbah-soak-"))
    mounted = _mount(disk, args.disk_size)
    if not mounted:
        print("soak: not root or no tmpfs: the disk-full fault is skipped", file=sys.stderr)
    server = Server(disk / "data", out / "server.log")
    server.start()
    ledger, stats = Ledger(), Stats()
    load = Load(server.address, ledger, stats, args.write_rate * (1 << 20))
    started = time.monotonic()
    until = started + args.minutes * 60
    samples: list[tuple[float, float, int, int]] = []
    events: list[tuple[float, str]] = []
    checks: list[dict] = []

    async def sampler() -> None:
        while time.monotonic() < until:
            taken = server.sample()
            if taken is not None:
                total = sum(stats.outcomes.values()) + sum(stats.excused.values())
                samples.append((time.monotonic() - started, taken[0], taken[1], total))
            await asyncio.sleep(2)

    async def faults() -> None:
        next_kill = started + args.kill_every
        next_fill = started + args.fill_every / 2
        while True:
            now = time.monotonic()
            if now + 5 >= until:
                return
            if mounted and now >= next_fill:
                events.append((now - started, "disk full"))
                await asyncio.to_thread(_fill, disk / "filler")
                await asyncio.sleep(args.full_for)
                os.unlink(disk / "filler")
                events.append((time.monotonic() - started, "disk freed"))
                next_fill = time.monotonic() + args.fill_every
            elif now >= next_kill:
                events.append((now - started, "SIGKILL"))
                load.restarting = True
                load.running.clear()
                server.kill()
                server.start()
                lost = await verify(server.address, ledger)
                checks.append({"at": round(time.monotonic() - started), "blobs": len(ledger.blobs),
                               "actions": len(ledger.actions), "assets": len(ledger.assets), "lost": lost})
                load.running.set()
                await asyncio.sleep(1)
                load.restarting = False
                next_kill = time.monotonic() + args.kill_every
            await asyncio.sleep(0.5)

    try:
        await asyncio.gather(sampler(), faults(), *(load.worker(until) for _ in range(args.concurrency)))
        lost = await verify(server.address, ledger)
        checks.append({"at": round(time.monotonic() - started), "blobs": len(ledger.blobs),
                       "actions": len(ledger.actions), "assets": len(ledger.assets), "lost": lost, "final": True})
    finally:
        await load.close()
        server.stop()
        if mounted:
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(disk)], check=False)
    summary = write_report(out, args, stats, samples, events, checks, server.log)
    print(json.dumps({k: summary[k] for k in ("requests", "lost_writes", "internal_or_unknown", "rss_mib",
                                               "open_files")}, indent=2))
    print(f"soak: report in {out}/summary.md, plot {out}/soak.png")
    return 1 if summary["lost_writes"] or summary["internal_or_unknown"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds between SIGKILLs (default 180)")
    parser.add_argument("--fill-every", type=float, default=150.0, help="seconds between disk fills (default 150)")
    parser.add_argument("--full-for", type=float, default=15.0, help="seconds the disk stays full (default 15)")
    parser.add_argument("--disk-size", default="3g", help="tmpfs size for the data directory (default 3g)")
    parser.add_argument("--write-rate", type=float, default=0.8, help="new distinct MiB/s written (default 0.8)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent client calls (default 16)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "soak-out"), help="report directory")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
