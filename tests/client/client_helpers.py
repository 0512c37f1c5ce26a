"""Helpers for the local-cache and `casbah cache|cas` tests: realistic trees, tree
comparison (content, modes, symlinks), and running the CLI in or out of process."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from casbah.cli import main
from casbah.storage.engine import stored_blobs

ROOT = Path(__file__).resolve().parent.parent.parent
#: The Python standard library the issue names; any stdlib will do when it is absent.
PREFERRED_STDLIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")


def stdlib_dir() -> Path:
    return PREFERRED_STDLIB if PREFERRED_STDLIB.is_dir() else Path(sysconfig.get_paths()["stdlib"])


def copy_stdlib(dest: Path) -> Path:
    """A copy of the standard library without site-packages and __pycache__ (~2.5k files,
    ~100 MB, including a 45 MB static library that goes over ByteStream), plus the
    awkward cases: an executable script, a symlink to a file, a symlink to a directory,
    a dangling symlink, an empty file, an empty executable and an empty directory."""
    shutil.copytree(stdlib_dir(), dest, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "__pycache__", "*.pyc"))
    add_awkward_entries(dest)
    return dest


def add_awkward_entries(dest: Path) -> None:
    script = dest / "tools-run.sh"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    (dest / "link-to-file").symlink_to("tools-run.sh")
    (dest / "link-to-dir").symlink_to("json")
    (dest / "dangling-link").symlink_to("does/not/exist")
    (dest / "empty-file").write_bytes(b"")
    (dest / "empty-exec").write_bytes(b"")
    (dest / "empty-exec").chmod(0o755)
    (dest / "empty-dir").mkdir()
    (dest / "nested" / "empty" / "dirs").mkdir(parents=True)


def small_tree(dest: Path, variant: str = "") -> Path:
    """A few files in a few directories, content depending on `variant`."""
    (dest / "src" / "pkg").mkdir(parents=True)
    (dest / "src" / "main.c").write_text(f"int main(void) {{ return 0; }} /* {variant} */\n")
    (dest / "src" / "pkg" / "util.h").write_text(f"#define VARIANT \"{variant}\"\n")
    (dest / "README").write_text("read me\n")
    run = dest / "run.sh"
    run.write_text(f"#!/bin/sh\necho {variant}\n")
    run.chmod(0o755)
    (dest / "latest").symlink_to("src/main.c")
    return dest


@dataclass
class Entry:
    kind: str  # "file", "dir", "symlink"
    mode: int
    target: str = ""
    data: bytes = b""


def snapshot(top: Path) -> dict[str, Entry]:
    """Every path under `top` with its kind, permission bits, symlink target and content."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(top))
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = Entry("symlink", 0, target=os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = Entry("dir", mode)
            else:
                out[rel] = Entry("file", mode, data=full.read_bytes())
    return out


def assert_same_tree(original: Path, copy: Path, exact_modes: bool) -> None:
    """Same paths, kinds, bytes and symlink targets (`diff -r --no-dereference`), and modes:
    `exact_modes` compares the permission bits of files (copies get 0644/0755); otherwise
    only the executable bits, since hard-linked checkouts are read-only by design."""
    proc = subprocess.run(["diff", "-r", "--no-dereference", str(original), str(copy)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"diff -r --no-dereference found differences:\n{proc.stdout[-3000:]}{proc.stderr}"
    a, b = snapshot(original), snapshot(copy)
    assert sorted(a) == sorted(b)
    for path, ea in a.items():
        eb = b[path]
        assert ea.kind == eb.kind, path
        assert ea.target == eb.target, path
        assert ea.data == eb.data, path
        if ea.kind == "file":
            if exact_modes:
                assert ea.mode == eb.mode, f"{path}: mode {eb.mode:o}, expected {ea.mode:o}"
            else:
                assert ea.mode & 0o111 == eb.mode & 0o111, f"{path}: mode {eb.mode:o} vs {ea.mode:o}"
                assert eb.mode & 0o222 == 0, f"{path}: a hard-linked checkout must be read-only"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def cli(*args: str, expect: int | None = 0, env: dict[str, str] | None = None) -> CliResult:
    """Run `casbah ARGS` in this process (real gRPC to real servers; no startup cost)."""
    runner = CliRunner()
    result = runner.invoke(main, list(args), env=env, catch_exceptions=True)
    out = CliResult(result.exit_code, result.stdout, result.stderr)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError(f"casbah {' '.join(args)} raised:\n"
                             + "".join(traceback.format_exception(result.exception)) + str(out))
    if expect is not None:
        assert out.code == expect, f"casbah {' '.join(args)}: expected exit {expect}, got {out}"
    return out


def cli_process(*args: str, expect: int | None = 0, env: dict[str, str] | None = None,
                timeout: float = 300) -> CliResult:
    """Run `python -m casbah ARGS` as its own process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "casbah", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    out = CliResult(proc.returncode, proc.stdout, proc.stderr)
    if expect is not None:
        assert out.code == expect, f"casbah {' '.join(args)}: expected exit {expect}, got {out}"
    return out


def object_files(cache_dir: Path) -> dict[str, int]:
    """Every object file of a local cache and its mtime (ns)."""
    out = {}
    for dirpath, _, files in os.walk(cache_dir / "objects"):
        for name in files:
            out[name] = (Path(dirpath) / name).stat().st_mtime_ns
    return out


def server_blob_files(data_dir: Path) -> dict[str, int]:
    """Every blob of a `casbah serve` disk storage and its length."""
    return stored_blobs(str(data_dir / "cas"))


def start_module_server(request, tmp_path_factory):
    """A `casbah serve` for a whole test module (starting one costs seconds on a busy
    machine); each test uses fresh content, so tests do not see each other's blobs.
    Returns (server, stop)."""
    conftest = request.config.pluginmanager.get_plugin(str(ROOT / "tests" / "conftest.py"))
    assert conftest is not None, "tests/conftest.py was not loaded"
    server = conftest.ServerProcess(tmp_path_factory.mktemp("casbah") / "data")
    return server.start(), server.stop
