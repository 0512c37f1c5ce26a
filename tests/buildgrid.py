"""BuildGrid 0.9.1 as a peer server for tests: start `bgd server start` on loopback.

BuildGrid is the Python REAPI server a casbah user would otherwise pick; client code
(push/pull, `casbah cas`) must work against it as well as against casbah.  It lives
in its own venv (Python 3.13, its own grpcio/protobuf pins), installed by
`scripts/buildgrid-venv` under `${CASBAH_TOOLS_HOME:-~/.cache/casbah-tools}/buildgrid`.
Tests that need it call `require_buildgrid()`, which skips naming that script when
it is missing.

    from buildgrid import start_buildgrid
    with start_buildgrid(tmp_path) as bg:
        ... bg.url ...

The config is the benchmark's (bench/targets.py): disk storage, instance "", CAS,
ByteStream and ActionCache, no auth.  BuildGrid has no Remote Asset and no
BuildStream ReferenceStorage service.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from bench.targets import BUILDGRID_CONFIG

TOOLS_HOME = Path(os.environ.get("CASBAH_TOOLS_HOME") or Path.home() / ".cache" / "casbah-tools")
BUILDGRID_VENV = TOOLS_HOME / "buildgrid"
#: Written by scripts/buildgrid-venv only once the install succeeded.
STAMP = BUILDGRID_VENV / ".casbah-buildgrid-stamp"
BGD = BUILDGRID_VENV / "bin" / "bgd"

#: The same BuildGrid setup the benchmarks measure (disk storage, CAS + ByteStream + AC, no auth).
CONFIG = BUILDGRID_CONFIG


def buildgrid_installed() -> bool:
    return STAMP.exists() and BGD.exists()


def require_buildgrid() -> Path:
    """The `bgd` command, or skip the test saying how to install it."""
    if not buildgrid_installed():
        pytest.skip(f"BuildGrid 0.9.1 is not installed at {BUILDGRID_VENV} (run scripts/buildgrid-venv)")
    return BGD


def clean_env() -> dict[str, str]:
    """The environment for BuildGrid's processes: nothing of the project venv may leak in."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BuildGrid:
    """A `bgd server start` child process on 127.0.0.1:<port> with disk storage under `work_dir`."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        self.work_dir = work_dir
        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"grpc://{self.address}"
        self.cas_dir = work_dir / "cas"
        self.config = work_dir / "buildgrid.yml"
        self.log_path = work_dir / "buildgrid.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> BuildGrid:
        bgd = require_buildgrid()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(CONFIG.format(address=self.address, cas_dir=self.cas_dir))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(bgd), "server", "start", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.work_dir, env=clean_env(),
                                         start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the port answers gRPC (BuildGrid takes a few seconds to import and start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"BuildGrid exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with grpc.insecure_channel(self.address) as channel:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
        raise RuntimeError(f"BuildGrid did not listen on {self.address} within {timeout:.0f}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""

    def blob_count(self) -> int:
        """Files in BuildGrid's disk storage (one per blob)."""
        return sum(len(files) for _, _, files in os.walk(self.cas_dir))

    def stop(self) -> None:
        """SIGTERM the server's process group (bgd may fork helpers), SIGKILL after 15 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> BuildGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_buildgrid(work_dir: Path, port: int | None = None) -> BuildGrid:
    """A started BuildGrid (use as a context manager, or call `.stop()`); skips when not installed."""
    return BuildGrid(work_dir, port).start()
