"""The real Redis, PostgreSQL and S3 servers the scale-out tests share, started once per
test process on first use and stopped at exit.

Module-level (not only pytest fixtures) because the storage contract factories in
tests/storage are plain async generators that cannot take fixtures; the session
fixtures in tests/scale/conftest.py hand out the same servers.  Tests that kill a
server start their own instead (`RedisServer(...)`, `PostgresServer()`), so a
failure there cannot leave the shared ones down.

Importable as `scale_env` from any test directory: it puts the repository root on
sys.path for `bench.services`, where the launchers live (the benchmark runs casbah
against the same servers).
"""

from __future__ import annotations

import atexit
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.services import S3_ACCESS_KEY, S3_SECRET_KEY, PostgresServer, RedisServer, S3Server  # noqa: E402

__all__ = [
    "CONFIGS", "ROOT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "PostgresServer", "RedisServer", "S3Server", "example_env",
    "postgres", "redis", "s3",
]

EXAMPLES = ROOT / "examples"
CONFIGS = {"s3-redis": EXAMPLES / "s3-redis.yaml", "s3-postgres": EXAMPLES / "s3-postgres.yaml"}

_started: dict[str, object] = {}
_failed: dict[str, str] = {}
_work = Path(tempfile.mkdtemp(prefix="casbah-scale-"))


def _shared(name: str, make):
    """The shared server `name`, started on first use; skips the calling test (with the
    reason) when it is not installed or does not start."""
    if name in _failed:
        pytest.skip(_failed[name])
    server = _started.get(name)
    if server is not None and server.alive():
        return server
    cls = {"redis": RedisServer, "postgres": PostgresServer, "s3": S3Server}[name]
    reason = cls.unavailable_reason()
    if reason is None:
        try:
            server = make()
        except (RuntimeError, OSError) as exc:
            reason = f"{name} server could not start: {exc}"
    if reason is not None:
        _failed[name] = reason
        pytest.skip(reason)
    _started[name] = server
    return server


def redis() -> RedisServer:
    return _shared("redis", lambda: RedisServer(_work / "redis").start())


def postgres() -> PostgresServer:
    return _shared("postgres", lambda: PostgresServer().start())


def s3() -> S3Server:
    return _shared("s3", lambda: S3Server(_work / "s3").start())


def example_env(s3: S3Server, redis: RedisServer | None = None, postgres: PostgresServer | None = None,
                bucket: str | None = None) -> dict[str, str]:
    """The environment examples/s3-*.yaml document, pointing at our servers; a fresh
    bucket per call unless one is given, so tests never see each other's blobs."""
    env = {**s3.env(), "CASBAH_S3_BUCKET": bucket or f"casbah-{uuid.uuid4().hex[:16]}"}
    if redis is not None:
        env["CASBAH_REDIS_URL"] = redis.url
    if postgres is not None:
        env["CASBAH_POSTGRES_URL"] = postgres.url
    return env


@atexit.register
def _stop_all() -> None:
    for server in _started.values():
        if isinstance(server, PostgresServer):
            server.remove()
        else:
            server.stop()  # type: ignore[attr-defined]
    import shutil

    shutil.rmtree(_work, ignore_errors=True)
