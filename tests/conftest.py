"""Shared fixtures: real casbah servers started as processes on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `casbah serve` child process; `address` is `127.0.0.1:PORT`."""

    def __init__(self, data_dir: Path, args: list[str] | None = None, port: int | None = None,
                 log_path: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = list(args or [])
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"grpc://{self.address}"
        self.log_path = log_path or data_dir.parent / f"casbah-{self.port}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "casbah", "serve", "--listen", self.address,
                "--data-dir", str(self.data_dir), *self.args]

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = open(self.log_path, "ab")
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll with plain TCP connects (cheap), then confirm once over gRPC."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"casbah exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            try:
                with grpc.insecure_channel(self.address) as channel:
                    grpc.channel_ready_future(channel).result(timeout=max(0.1, deadline - time.monotonic()))
                return
            except grpc.FutureTimeoutError:
                break
        raise RuntimeError(f"casbah did not listen on {self.address}:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Factory: `start_server(args=[...], data_dir=...)` -> a started ServerProcess."""
    servers: list[ServerProcess] = []

    def start(args: list[str] | None = None, data_dir: Path | None = None, **kwargs) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / f"data{len(servers)}", args, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server) -> ServerProcess:
    """A casbah server on disk storage with default settings."""
    return start_server()


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator:
    """`tmpfs(size)`: a fresh tmpfs of `size` (mount's syntax, e.g. "12m") under `tmp_path`,
    unmounted afterwards; skips where mounting is not allowed (it needs root).  The way to
    cause a full disk for real."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
        mounts.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounts:
            subprocess.run(["umount", "-l", str(where)], check=False)
