"""Fixtures for the scale-out tests: real Redis, PostgreSQL and S3 servers on loopback,
and casbah servers run from the examples/ configs exactly as documented.

The shared servers (session scope) come from scale_env, which the storage contract
factories use too.  A test that kills a server asks for `private_redis` or
`private_postgres` instead: its own instance, so the shared ones stay up whatever
happens to the test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import scale_env
from scale_env import CONFIGS, PostgresServer, RedisServer, S3Server, example_env

SERVER_TESTS = Path(__file__).resolve().parent.parent / "server"
if str(SERVER_TESTS) not in sys.path:  # the plain-stub client helpers of the service tests
    sys.path.insert(0, str(SERVER_TESTS))


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    return scale_env.redis()


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    return scale_env.postgres()


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    return scale_env.s3()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    reason = RedisServer.unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    reason = PostgresServer.unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer().start()
    yield server
    server.remove()


@pytest.fixture
def example_servers(start_server, s3_server: S3Server, request: pytest.FixtureRequest,
                    tmp_path: Path) -> Callable:
    """`example_servers(name, count, redis=..., postgres=...)`: `count` casbah servers
    running examples/NAME.yaml on one environment (same bucket, same Redis/PostgreSQL)."""

    def start(name: str, count: int = 2, redis: RedisServer | None = None,
              postgres: PostgresServer | None = None, args: tuple[str, ...] = ()) -> list:
        if name == "s3-redis" and redis is None:
            redis = request.getfixturevalue("redis_server")
        if name == "s3-postgres" and postgres is None:
            postgres = request.getfixturevalue("postgres_server")
        env = example_env(s3_server, redis, postgres)
        return [start_server(["--config", str(CONFIGS[name]), *args], data_dir=tmp_path / f"{name}-{i}", env=env)
                for i in range(count)]

    return start
