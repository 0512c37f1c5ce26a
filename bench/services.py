"""Real backing servers on loopback for scale-out setups: Redis, PostgreSQL 15, an S3 server.

Shared by the scale-out tests (tests/scale) and the S3/Redis/PostgreSQL benchmark
targets, so both run casbah against the same real servers, never mocks:

- `RedisServer`: Debian's `redis-server` with AOF `appendfsync always` (what
  docs/deployment.md asks for), so an acknowledged write survives a kill.
- `PostgresServer`: Debian's PostgreSQL 15 (`initdb` + `postgres`) in a fresh
  data directory.  PostgreSQL refuses to run as root, so as root the server runs as
  the `postgres` OS user (set by `subprocess`, no `su` in between, so the pid we
  hold is the postmaster's) with a data directory it owns under /tmp (pytest's
  temporary directories are private to root).
- `S3Server`: moto's standalone server (`python -m moto.server`), a real HTTP
  server speaking the S3 protocol; its buckets live in its memory.

Each has `start()`, `stop()` (clean shutdown), `kill()` (SIGKILL of the whole
process tree, as a crash), `restart` by `start()` again on the same port and data,
and `log()`.  `unavailable_reason()` says why a server cannot run here (not
installed), for a test to skip with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_BIN = Path(os.environ.get("CASBAH_PG_BIN", "/usr/lib/postgresql/15/bin"))
S3_ACCESS_KEY = "casbah-test"
S3_SECRET_KEY = "casbah-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant (a crash: nothing gets to clean up)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()
    psutil.wait_procs(children, timeout=10)


class _Service:
    name = "service"

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = root / f"{self.name}.log"

    def log(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, cmd: list[str], **kwargs) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, **kwargs)

    def _wait(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become ready on port {self.port}:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(self._stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(self.proc)
        self.proc = None

    _stop_signal = signal.SIGTERM

    def kill(self) -> None:
        if self.proc is not None:
            _kill_tree(self.proc)
            self.proc = None


class RedisServer(_Service):
    name = "redis"

    @staticmethod
    def unavailable_reason() -> str | None:
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (scripts/system-deps installs it)"
        return None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> RedisServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self._spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.root),
                     "--protected-mode", "no", "--daemonize", "no"])
        self._wait(self._ping, timeout)
        return self

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")


class PostgresServer(_Service):
    """PostgreSQL with a database `casbah` owned by role `casbah` (password `secret`).

    Authentication is `trust` on loopback: the password in `url` is there so the
    messages that must hide it have one to hide."""

    name = "postgres"
    _stop_signal = signal.SIGINT  # "fast" shutdown: abort sessions, checkpoint, exit

    def __init__(self, root: Path | None = None, port: int | None = None) -> None:
        # Under /tmp (world-traversable), not under a private pytest directory.
        super().__init__(root or Path(tempfile.mkdtemp(prefix="casbah-pg-")), port)
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self._as_postgres = os.geteuid() == 0
        self._initialized = False

    @staticmethod
    def unavailable_reason() -> str | None:
        if not (PG_BIN / "initdb").exists() or not (PG_BIN / "postgres").exists():
            return f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing; scripts/system-deps installs it)"
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no `postgres` OS user to run PostgreSQL as"
        return None

    @property
    def url(self) -> str:
        return f"postgresql://casbah:secret@127.0.0.1:{self.port}/casbah"

    def _user(self) -> dict:
        return {"user": "postgres", "group": "postgres", "extra_groups": []} if self._as_postgres else {}

    def _init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self._as_postgres:
            for path in (self.root, self.sockets):
                shutil.chown(path, "postgres", "postgres")
        proc = subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                               "-E", "UTF8", "--no-sync"], cwd=self.root, capture_output=True, text=True,
                              **self._user())
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        self._initialized = True

    def start(self, timeout: float = 60.0) -> PostgresServer:
        first = not self._initialized
        if first:
            self._init()
        self._spawn([str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.sockets),
                     "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
                     "-c", "shared_buffers=32MB"], cwd=self.root, **self._user())
        self._wait(self._connects, timeout)
        if first:
            self._create_database()
        return self

    def _connects(self) -> bool:
        import psycopg

        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE ROLE casbah LOGIN PASSWORD 'secret'")
            conn.execute("CREATE DATABASE casbah OWNER casbah")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class S3Server(_Service):
    """moto's S3 server; clients use `S3_ACCESS_KEY`/`S3_SECRET_KEY` (any key is accepted)."""

    name = "s3"

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            import flask  # noqa: F401  (moto's server mode needs it: moto[server])
            import moto.server  # noqa: F401
        except ImportError as exc:
            return f"moto's server mode is not installed ({exc}; pip install -e .[dev] installs moto[server])"
        return None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a casbah process needs to reach this store through the AWS credential chain."""
        return {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "CASBAH_S3_ENDPOINT": self.endpoint}

    def start(self, timeout: float = 60.0) -> S3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], env=env)
        self._wait(self._answers, timeout)
        return self

    def _answers(self) -> bool:
        with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2) as response:
            return response.status == 200
