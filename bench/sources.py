"""Source-cache benchmark: `casbah source fetch-all` of a manifest, warm asset cache vs native.

    python -m bench.sources [--git 25] [--tar 25] [--files 40] [--file-size 4096] [--jobs 8] [--repeat 3]

It generates N git repositories (served by `git daemon` on loopback) and N tarballs
(served by `python -m http.server` on loopback), starts casbah, and measures the same
`fetch-all` (the library function the CLI runs, in-process, so Python start-up is not
counted on either side) three ways, each into a fresh destination:

- native: `asset-fetch off`, fresh local cache: every source from its origin;
- warm, fresh local cache: `asset-fetch only` after one pushing run (a new CI machine
  with a warm casbah): every tree comes from casbah;
- warm, warm local cache: the same with the local cache kept (a second build on
  the same machine): only FetchDirectory calls, no content moves.

The modes are interleaved run by run, so load from elsewhere hits them alike.
Medians of `--repeat` runs and the ratio native / warm are printed and written as JSON
(`--json PATH`).  The origin helpers here (GitDaemon, HttpOrigin, make_git_repo,
make_tarball, make_zip) are also what tests/client/test_source_cache.py uses.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}")


class _Served:
    """A server child process in its own process group (git daemon forks per connection)."""

    port: int
    proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> _Served:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        _wait_port(self.port, self.proc, type(self).__name__)
        return self

    def stop(self) -> None:
        """Stop it and make sure the port refuses connections before returning."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class HttpOrigin(_Served):
    """`python -m http.server` serving a directory on 127.0.0.1 (a real HTTP origin)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        root.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(self.root),
                str(self.port)]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


class GitDaemon(_Served):
    """`git daemon` exporting every repository under a directory on 127.0.0.1."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        root.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return ["git", "daemon", f"--base-path={self.root}", "--export-all", "--reuseaddr", "--listen=127.0.0.1",
                f"--port={self.port}", str(self.root)]

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"


# -- content -------------------------------------------------------------------------


@dataclass(frozen=True)
class Exe:
    """An executable file's content."""

    data: bytes


@dataclass(frozen=True)
class Link:
    """A symlink's target."""

    target: str


#: A tree: relative path -> bytes (a 0644 file), Exe (0755) or Link.
Files = dict[str, "bytes | Exe | Link"]


def expected_snapshot(files: Files) -> dict[str, tuple]:
    """What `snapshot` returns for a directory holding exactly `files`."""
    out: dict[str, tuple] = {}
    for path, entry in files.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = ("dir",)
        if isinstance(entry, Link):
            out[path] = ("link", entry.target)
        elif isinstance(entry, Exe):
            out[path] = ("file", entry.data, True)
        else:
            out[path] = ("file", entry, False)
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: files (content, executable), symlinks (target), directories."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            st = full.lstat()
            if full.is_symlink():
                out[rel] = ("link", os.readlink(full))
            elif full.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", full.read_bytes(), bool(st.st_mode & 0o100))
    return out


def _git(*args: str, cwd: Path | None = None, stdin: bytes | None = None) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
    done = subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode()


def make_git_repo(path: Path, commits: list[Files], branch: str = "main", tags: dict[int, str] | None = None
                  ) -> list[str]:
    """A bare repository whose `branch` has one commit per tree (each a full snapshot);
    returns the commit ids.  One `git fast-import` run: fast, and dates are fixed, so
    the same trees always give the same commits."""
    _git("init", "-q", "--bare", str(path))
    stream = io.BytesIO()
    for n, files in enumerate(commits, start=1):
        message = f"commit {n}\n".encode()
        stream.write(f"commit refs/heads/{branch}\nmark :{n}\n".encode())
        stream.write(f"committer Bench <bench@example.com> {1_700_000_000 + n} +0000\n".encode())
        stream.write(b"data %d\n%s\n" % (len(message), message))
        if n > 1:
            stream.write(f"from :{n - 1}\n".encode())
        stream.write(b"deleteall\n")
        for name, entry in sorted(files.items()):
            if isinstance(entry, Link):
                mode, data = "120000", entry.target.encode()
            elif isinstance(entry, Exe):
                mode, data = "100755", entry.data
            else:
                mode, data = "100644", entry
            stream.write(f"M {mode} inline {name}\n".encode())
            stream.write(b"data %d\n%s\n" % (len(data), data))
    for n, tag in (tags or {}).items():
        stream.write(f"reset refs/tags/{tag}\nfrom :{n}\n\n".encode())
    _git("--git-dir", str(path), "fast-import", "--quiet", stdin=stream.getvalue())
    log = _git("--git-dir", str(path), "rev-list", "--reverse", branch)
    return log.split()


def _add_tar(tar: tarfile.TarFile, name: str, entry: bytes | Exe | Link) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    if isinstance(entry, Link):
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
        tar.addfile(info)
        return
    data = entry.data if isinstance(entry, Exe) else entry
    info.size = len(data)
    info.mode = 0o755 if isinstance(entry, Exe) else 0o644
    tar.addfile(info, io.BytesIO(data))


def make_tarball(path: Path, files: Files, prefix: str = "", compression: str = "gz",
                 extra: list[tarfile.TarInfo] | None = None) -> str:
    """Write a tarball of `files` (under `prefix/` when given); returns its sha256.
    `extra` members (devices, hostile names) are appended as they are."""
    with tarfile.open(path, f"w:{compression}" if compression else "w") as tar:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        for d in ([prefix] if prefix else []) + [f"{prefix}/{d}" if prefix else d for d in dirs]:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, entry in sorted(files.items()):
            _add_tar(tar, f"{prefix}/{name}" if prefix else name, entry)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_zip(path: Path, files: Files, extra: list[tuple[str, int, bytes]] | None = None) -> str:
    """Write a zip of `files` with Unix modes (executable bits kept); returns its sha256.
    `extra`: (name, st_mode, data) entries written as they are (hostile ones)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, entry in sorted(files.items()):
            if isinstance(entry, Link):
                raise ValueError("zip sources refuse symlinks")
            info = zipfile.ZipInfo(name, date_time=(2023, 11, 14, 22, 13, 20))
            info.create_system = 3
            info.external_attr = ((0o100755 if isinstance(entry, Exe) else 0o100644) << 16)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entry.data if isinstance(entry, Exe) else entry)
        for name, mode, data in extra or []:
            info = zipfile.ZipInfo(name, date_time=(2023, 11, 14, 22, 13, 20))
            info.create_system = 3
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_tree(rng: random.Random, files: int, size: int, tag: str) -> Files:
    """A source-like tree: a few directories, mostly text-ish files, one script, one symlink."""
    tree: Files = {}
    for i in range(files):
        depth = rng.randrange(3)
        parts = [f"d{rng.randrange(4)}" for _ in range(depth)] + [f"f{i}.c"]
        body = f"/* {tag} {i} */\n".encode() + rng.randbytes(size // 2).hex().encode()[: size]
        tree["/".join(parts)] = body
    tree["configure"] = Exe(f"#!/bin/sh\necho {tag}\n".encode())
    tree["README"] = f"{tag}\n".encode()
    tree["LINK"] = Link("README")
    return tree


# -- the benchmark -------------------------------------------------------------------


@dataclass
class Corpus:
    git: GitDaemon
    http: HttpOrigin
    manifest: dict  # the YAML manifest (no remotes)
    trees: dict[str, Files]  # directory -> expected files


def make_corpus(root: Path, n_git: int, n_tar: int, files: int, size: int, seed: int = 1) -> Corpus:
    rng = random.Random(seed)
    git = GitDaemon(root / "git")
    http = HttpOrigin(root / "http")
    sources: list[dict] = []
    trees: dict[str, Files] = {}
    for i in range(n_git):
        tree = random_tree(rng, files, size, f"git{i}")
        (commit,) = make_git_repo(git.root / f"repo{i}.git", [tree])
        directory = f"git/repo{i}"
        sources.append({"kind": "git", "url": git.url(f"repo{i}.git"), "ref": commit, "branch": "main",
                        "directory": directory})
        trees[directory] = tree
    for i in range(n_tar):
        tree = random_tree(rng, files, size, f"tar{i}")
        sha = make_tarball(http.root / f"pkg{i}.tar.gz", tree)
        directory = f"tar/pkg{i}"
        sources.append({"kind": "tar", "url": http.url(f"pkg{i}.tar.gz"), "sha256": sha, "directory": directory})
        trees[directory] = tree
    return Corpus(git, http, {"sources": sources}, trees)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> dict:
    from bench.targets import start_target, stop_target
    from casbah.cli.source import Manifest, fetch_manifest

    work = Path(tempfile.mkdtemp(prefix="casbah-bench-sources-"))
    target = None
    corpus = None
    try:
        t0 = time.monotonic()
        corpus = make_corpus(work / "origins", args.git, args.tar, args.files, args.file_size, args.seed)
        print(f"corpus: {args.git} git repos + {args.tar} tarballs, {args.files + 3} files each "
              f"({time.monotonic() - t0:.1f}s to generate)")
        corpus.git.start()
        corpus.http.start()
        target = start_target("casbah", work, casbah_args=[], install=False)
        remote = {"url": f"grpc://{target.address}"}
        native = Manifest.model_validate(corpus.manifest)
        cached = Manifest.model_validate({**corpus.manifest, "remotes": [remote]})
        counter = iter(range(1_000_000))

        def fresh(name: str) -> Path:
            return work / f"{name}-{next(counter)}"

        def timed(spec: Manifest, label: str, cache_dir: Path | None = None, **policies: str) -> float:
            dest = fresh("dest")
            result = fetch_manifest(spec, dest, cache_dir or fresh("cache"), args.jobs, **policies)
            if result.failures:
                raise RuntimeError(f"{label}: {len(result.failures)} failures, e.g. {result.failures[0]}")
            if policies["asset_fetch"] == "only" and result.summary.counts["hit"] != len(corpus.trees):
                raise RuntimeError(f"{label}: expected every source to hit: {result.summary.line()}")
            for directory in corpus.trees:  # spot-check: every run must stage real trees
                if not (dest / directory / "README").is_file():
                    raise RuntimeError(f"{label}: {directory} was not staged")
            shutil.rmtree(dest)
            print(f"  {label}: {result.seconds:.3f}s ({result.summary.line()})")
            return result.seconds

        figures: dict[str, list[float]] = {"native": [], "warm_fresh_local": [], "warm_local": []}
        timed(cached, "warming (native + push)", asset_fetch="off", asset_push="on")
        local = fresh("cache")
        timed(cached, "filling a local cache", local, asset_fetch="only", asset_push="off")
        # Interleaved, so that load from elsewhere on the machine hits every mode alike.
        # `asset-fetch only` never contacts an origin (the tests prove it with the origins
        # stopped; the summary line shows 50 hits and no native fetch).
        for _ in range(args.repeat):
            figures["native"].append(timed(native, "native", asset_fetch="off", asset_push="off"))
            figures["warm_fresh_local"].append(timed(cached, "warm cache, fresh local cache", asset_fetch="only",
                                                     asset_push="off"))
            figures["warm_local"].append(timed(cached, "warm cache, warm local cache", local, asset_fetch="only",
                                               asset_push="off"))
        medians = {k: round(_median(v), 3) for k, v in figures.items()}
        report = {
            "sources": args.git + args.tar, "git": args.git, "tar": args.tar, "files_per_source": args.files + 3,
            "file_size": args.file_size, "jobs": args.jobs, "repeat": args.repeat, "seconds": figures,
            "median_s": medians,
            "ratio_native_over_warm_fresh_local": round(medians["native"] / medians["warm_fresh_local"], 2),
            "ratio_native_over_warm_local": round(medians["native"] / medians["warm_local"], 2),
            "cpus": os.cpu_count(),
        }
        return report
    finally:
        if corpus is not None:
            corpus.git.stop()
            corpus.http.stop()
        if target is not None:
            stop_target(target)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sources", description=__doc__.split("\n\n")[0])
    p.add_argument("--git", type=int, default=25, help="git repositories (25)")
    p.add_argument("--tar", type=int, default=25, help="tarballs (25)")
    p.add_argument("--files", type=int, default=40, help="generated files per source, plus 3 fixed ones (40)")
    p.add_argument("--file-size", type=int, default=4096, help="bytes per generated file (4096)")
    p.add_argument("--jobs", "-j", type=int, default=8, help="fetch-all parallelism (8)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per mode; medians reported (5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    report = run(args)
    m = report["median_s"]
    print(f"\n{report['sources']} sources, -j {args.jobs}, median of {args.repeat}:")
    print(f"  native from local origins           {m['native']:.3f}s")
    print(f"  warm casbah, fresh local cache      {m['warm_fresh_local']:.3f}s   "
          f"(native / warm = {report['ratio_native_over_warm_fresh_local']:.2f}x)")
    print(f"  warm casbah, warm local cache       {m['warm_local']:.3f}s   "
          f"(native / warm = {report['ratio_native_over_warm_local']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

