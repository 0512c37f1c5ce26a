"""`client_tree`: casbah's client against BuildGrid's, moving a real 10k-file tree.

Not a server benchmark: both clients talk to the *same* server (the run's target,
normally casbah), so the difference is the client.  The tree is the Python standard
library (without site-packages and __pycache__) copied until it has 10k files (x
scale), every file's bytes made unique per run so the server has never seen them.
Every command runs as its own process, as a user runs it (interpreter start-up
included):

| casbah | BuildGrid 0.9.1 |
|---|---|
| `casbah cache commit DIR --ref R` (hash + store locally) | - |
| `casbah cache push R --publish none` (FindMissing + upload) | `bgd cas upload-dir DIR` (hash + upload) |
| `casbah cas upload DIR` (hash + FindMissing + upload) | same |
| `casbah cache pull DIGEST` (GetTree + download into the cache) | - |
| `casbah cache checkout DIGEST OUT` (hard links) | - |
| pull + checkout (two processes) | `bgd cas download-dir DIGEST OUT` |
| `casbah cache pull DIGEST --checkout OUT` (one process) | same |
| `casbah cas download DIGEST -o OUT` (straight to files) | same |

Each side uploads its own copy of the tree (same shape and sizes, different bytes):
re-uploading present blobs would measure FindMissingBlobs, not the upload path.
`bgd cas upload-dir` does not call FindMissingBlobs, so it would not benefit anyway.
Repeats alternate which client goes first, so a drifting machine load favours neither.
Every download is checked: the tree written must hash back to the root digest.

Ratios (> 1 means casbah is faster): push = upload-dir / push, pull = download-dir / pull,
and the stricter ones that include what bgd does and casbah splits off: upload-dir /
(commit + push), download-dir / (pull + checkout), download-dir / `pull --checkout`; also
`cas upload` and `cas download`, which like bgd work without a local cache.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import BenchError, VerificationError
from bench.context import Context, Metric, ScenarioResult
from bench.targets import ROOT, buildgrid_bin, server_cpu_seconds

#: Files larger than this are included once, not in every copy of the library (libpython.a is 45 MB).
BIG_FILE = 8 * 1024 * 1024


def source_library() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def make_tree(dest: Path, salt: str, files: int) -> tuple[int, int]:
    """Copies of the standard library under dest/copyN until `files` files; each file's
    content gets `salt` appended, so every run's blobs are new.  (files, bytes)."""
    src = source_library()
    count = total = 0
    copy = 0
    while count < files:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
            out = dest / f"copy{copy}" / os.path.relpath(dirpath, src)
            out.mkdir(parents=True, exist_ok=True)
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if not os.path.isfile(path) or os.path.islink(path) or (copy and st.st_size > BIG_FILE):
                    continue
                with open(path, "rb") as f:
                    data = f.read() + f"\n# {salt} {copy}\n".encode()
                target = out / name
                target.write_bytes(data)
                target.chmod(0o755 if st.st_mode & 0o111 else 0o644)
                count += 1
                total += len(data)
                if count >= files:
                    return count, total
        copy += 1
        if copy > 1000:
            raise BenchError(f"{src} has no regular files to build a tree from")
    return count, total


@dataclass
class Run:
    wall: float
    cpu: float  # client user + system CPU
    server_cpu: float | None
    stdout: str
    stderr: str


class Clients:
    """Runs the two CLIs as child processes, timing wall clock, client CPU and server CPU."""

    def __init__(self, ctx: Context, bgd: Path) -> None:
        self.ctx = ctx
        self.bgd = bgd
        self.url = f"grpc://{ctx.address}"
        self.casbah_env = dict(os.environ)
        self.casbah_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), self.casbah_env.get("PYTHONPATH", "")) if p)
        self.bgd_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}

    def _run(self, cmd: list[str], env: dict[str, str], what: str) -> Run:
        # Flush what the previous step wrote (untimed): otherwise its write-back lands on
        # whoever runs next, and the order of the steps would decide the figures.
        os.sync()
        cpu0 = server_cpu_seconds(self.ctx.target)
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        wall = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1 = server_cpu_seconds(self.ctx.target)
        if proc.returncode != 0:
            raise BenchError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        if "Error" in proc.stderr and cmd[0] == str(self.bgd):  # bgd exits 0 after some errors
            raise BenchError(f"{what} reported an error: {proc.stderr[-3000:]}")
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        server = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        self.ctx.phases.append({"phase": what, "wall_s": round(wall, 3), "client_cpu_s": round(cpu, 3),
                                "server_cpu_s": None if server is None else round(server, 3)})
        return Run(wall, cpu, server, proc.stdout, proc.stderr)

    def casbah(self, *args: str, what: str) -> Run:
        return self._run([sys.executable, "-m", "casbah", *args], self.casbah_env, what)

    def bgd_cas(self, *args: str, what: str) -> Run:
        remote = f"http://{self.ctx.address}"
        instance = ["--instance-name", self.ctx.instance] if self.ctx.instance else []
        return self._run([str(self.bgd), "cas", "--remote", remote, *instance, *args], self.bgd_env, what)


def _bgd_root(stdout: str, tree: Path) -> str:
    """The root digest from `bgd cas upload-dir`'s last `Success: Pushed path=[DIR] ...` line."""
    for line in reversed(stdout.splitlines()):
        if f"path=[{tree}]" in line and "digest=[" in line:
            return line.rsplit("digest=[", 1)[1].rstrip("]")
    raise BenchError(f"bgd cas upload-dir printed no root digest for {tree}:\n{stdout[-2000:]}")


def _check_tree(out: Path, root: str, what: str) -> None:
    """The written tree must hash back to the root digest (content, names, modes, symlinks)."""
    from casbah.tree import build_tree

    got = str(build_tree(out).root)
    if got != root:
        raise VerificationError(f"{what}: the tree written to {out} hashes to {got}, not {root}")


def client_tree(ctx: Context) -> ScenarioResult:
    """Commit/push/pull/checkout of a 10k-file tree with casbah's CLI vs `bgd cas upload-dir|download-dir`."""
    nfiles = ctx.scaled(10_000, minimum=200)
    bgd = buildgrid_bin(install=True)
    clients = Clients(ctx, bgd)
    remote = ["--remote", clients.url] + (["--instance", ctx.instance] if ctx.instance else [])
    figures: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    server_cpu: dict[str, list[float | None]] = {}
    tree_bytes = 0

    def note(name: str, run: Run) -> float:
        figures.setdefault(name, []).append(run.wall)
        cpu.setdefault(name, []).append(run.cpu)
        server_cpu.setdefault(name, []).append(run.server_cpu)
        return run.wall

    work = Path(tempfile.mkdtemp(prefix="casbah-client-tree-"))
    try:
        for r in range(ctx.repeats(3)):
            tree_bytes = _one_repeat(ctx, clients, remote, work / f"r{r}", r, nfiles, note)
            print(f"    client_tree repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in figures.items()),
                  file=sys.stderr, flush=True)
    finally:
        # Deleted only at the end: ext4 makes creating files slow right after mass deletions
        # (the inode allocator skips recently freed inodes), which would tax whoever runs next.
        shutil.rmtree(work, ignore_errors=True)

    figures["pull + checkout"] = [p + c for p, c in zip(figures["pull"], figures["checkout"], strict=True)]
    cpu["pull + checkout"] = [p + c for p, c in zip(cpu["pull"], cpu["checkout"], strict=True)]
    figures["commit + push"] = [p + c for p, c in zip(figures["commit"], figures["push"], strict=True)]
    cpu["commit + push"] = [p + c for p, c in zip(cpu["commit"], cpu["push"], strict=True)]
    mb = tree_bytes / 1e6
    metrics: list = []
    for name in ("commit", "push", "commit + push", "cas upload", "bgd upload-dir", "pull", "checkout",
                 "pull + checkout", "pull --checkout", "cas download", "bgd download-dir"):
        walls = figures[name]
        metrics.append(Metric(name, "files/s", [nfiles / w for w in walls]))
        metrics.append(Metric(name, "MB/s", [mb / w for w in walls]))

    def ratios(ours: str, theirs: str) -> list[float]:
        return [b / a for a, b in zip(figures[ours], figures[theirs], strict=True)]

    for label, ours, theirs in (
        ("push vs bgd upload-dir", "push", "bgd upload-dir"),
        ("commit+push vs bgd upload-dir", "commit + push", "bgd upload-dir"),
        ("cas upload vs bgd upload-dir", "cas upload", "bgd upload-dir"),
        ("pull vs bgd download-dir", "pull", "bgd download-dir"),
        ("pull --checkout vs bgd download-dir", "pull --checkout", "bgd download-dir"),
        ("pull+checkout vs bgd download-dir", "pull + checkout", "bgd download-dir"),
        ("cas download vs bgd download-dir", "cas download", "bgd download-dir"),
    ):
        metrics.append(Metric(label, "x", ratios(ours, theirs)))
    cpu_ratio = {
        "push": _median_ratio(cpu["bgd upload-dir"], cpu["push"]),
        "pull + checkout": _median_ratio(cpu["bgd download-dir"], cpu["pull + checkout"]),
    }
    return ScenarioResult(metrics, {
        "files": nfiles, "bytes": tree_bytes, "source": str(source_library()), "bgd": str(bgd),
        "wall_s": figures, "client_cpu_s": cpu, "server_cpu_s": server_cpu,
        "client_cpu_ratio_bgd_over_casbah": cpu_ratio,
    })


def _one_repeat(ctx: Context, clients: Clients, remote: list[str], base: Path, r: int, nfiles: int,
                note: Callable[[str, Run], float]) -> int:
    """One round: three fresh trees (casbah push, bgd upload-dir, casbah cas upload), then the
    three downloads, each checked.  Odd rounds run BuildGrid's client first.  Returns the tree's bytes."""
    trees = {}
    tree_bytes = 0
    for side in ("casbah", "bgd", "cas-upload"):
        trees[side] = base / side / "tree"
        _, tree_bytes = make_tree(trees[side], f"{ctx.new_seed(f'client-tree-{side}-{r}')}", nfiles)
    cache_args = ["--cache-dir", str(base / "casbah" / "cache")]

    def casbah_push() -> str:
        note("commit", clients.casbah("cache", "commit", *cache_args, str(trees["casbah"]), "--ref", "tree",
                                      what="casbah cache commit"))
        run = clients.casbah("cache", "push", *cache_args, *remote, "--publish", "none", "tree",
                             what="casbah cache push")
        note("push", run)
        return run.stdout.strip()

    def bgd_push() -> str:
        run = clients.bgd_cas("upload-dir", str(trees["bgd"]), what="bgd cas upload-dir")
        note("bgd upload-dir", run)
        return _bgd_root(run.stdout, trees["bgd"])

    def cas_upload() -> str:
        run = clients.casbah("cas", "upload", *remote, str(trees["cas-upload"]), what="casbah cas upload")
        note("cas upload", run)
        return run.stdout.split()[0]

    order = [casbah_push, bgd_push, cas_upload] if r % 2 == 0 else [bgd_push, cas_upload, casbah_push]
    roots = {fn.__name__: fn() for fn in order}

    pulled = base / "casbah" / "pulled-cache"
    checkout = base / "casbah" / "checkout"
    checkout2 = base / "casbah" / "checkout2"
    direct = base / "casbah" / "direct"
    bgd_out = base / "bgd" / "download"

    def casbah_pull() -> None:
        note("pull", clients.casbah("cache", "pull", "--cache-dir", str(pulled), *remote, roots["casbah_push"],
                                    what="casbah cache pull"))
        note("checkout", clients.casbah("cache", "checkout", "--cache-dir", str(pulled), roots["casbah_push"],
                                        str(checkout), what="casbah cache checkout"))

    def casbah_pull_checkout() -> None:
        note("pull --checkout", clients.casbah("cache", "pull", "--cache-dir", str(base / "casbah" / "cache2"),
                                               *remote, roots["casbah_push"], "--checkout", str(checkout2),
                                               what="casbah cache pull --checkout"))

    def bgd_pull() -> None:
        note("bgd download-dir", clients.bgd_cas("download-dir", roots["bgd_push"], str(bgd_out),
                                                 what="bgd cas download-dir"))

    def cas_download() -> None:
        note("cas download", clients.casbah("cas", "download", *remote, roots["cas_upload"], "-o", str(direct),
                                            what="casbah cas download"))

    steps = [casbah_pull, bgd_pull, cas_download, casbah_pull_checkout]
    for fn in steps if r % 2 == 0 else steps[::-1]:
        fn()
    _check_tree(checkout, roots["casbah_push"], "casbah cache pull + checkout")
    _check_tree(checkout2, roots["casbah_push"], "casbah cache pull --checkout")
    _check_tree(direct, roots["cas_upload"], "casbah cas download")
    _check_tree(bgd_out, roots["bgd_push"], "bgd cas download-dir")
    return tree_bytes


def _median_ratio(theirs: list[float], ours: list[float]) -> float:
    values = [t / o for t, o in zip(theirs, ours, strict=True) if o > 0]
    return statistics.median(values) if values else math.nan
