"""Scale-out: several casbah servers over the same S3 store and Redis or PostgreSQL.

Each test runs `casbah serve --config examples/s3-redis.yaml` or
`examples/s3-postgres.yaml` unchanged, with the environment the examples document
pointing at real servers on loopback (moto's S3 server, redis-server with AOF
`always`, PostgreSQL 15), and talks to casbah with plain gRPC stubs.  What is
checked is the promise of the topology in docs/deployment.md: any server answers
any request (blobs, ActionCache entries and assets written through one are served
by another), a lost Redis/PostgreSQL is UNAVAILABLE naming it (never its password)
and nothing it acknowledged is lost across its restart, and `--workers N` spreads
connections over N processes and refuses what it cannot share.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import grpc
import psutil
import pytest
from scale_env import CONFIGS, ROOT, PostgresServer, RedisServer, S3Server, example_env
from server_test_helpers import (
    OPTIONS,
    ac,
    bs_read,
    bs_write,
    cas,
    missing,
    rand,
    read_name,
    rpc_error,
    sha,
    upload,
    write_name,
)

from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

MiB = 1 << 20
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ALL_CONFIGS = pytest.mark.parametrize("config", sorted(CONFIGS))


def channel(server) -> grpc.Channel:
    # A connection of its own (not shared with other channels to the same address).
    return grpc.insecure_channel(server.address, options=[*OPTIONS, ("grpc.use_local_subchannel_pool", 1)])


def bucket_keys(s3: S3Server, bucket: str) -> set[str]:
    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                          region_name="us-east-1")
    return {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}


def push_blob(ch: grpc.Channel, uri: str, digest: re_pb2.Digest, **qualifiers: str) -> None:
    ra_grpc.PushStub(ch).PushBlob(ra_pb2.PushBlobRequest(
        uris=[uri], blob_digest=digest, qualifiers=[ra_pb2.Qualifier(name=n, value=v) for n, v in qualifiers.items()]))


def fetch_blob(ch: grpc.Channel, uri: str, **qualifiers: str) -> ra_pb2.FetchBlobResponse:
    return ra_grpc.FetchStub(ch).FetchBlob(ra_pb2.FetchBlobRequest(
        uris=[uri], qualifiers=[ra_pb2.Qualifier(name=n, value=v) for n, v in qualifiers.items()]), timeout=30)


def get_result(ch: grpc.Channel, action: re_pb2.Digest) -> re_pb2.ActionResult:
    return ac(ch).GetActionResult(re_pb2.GetActionResultRequest(action_digest=action), timeout=30)


def put_result(ch: grpc.Channel, action: re_pb2.Digest, result: re_pb2.ActionResult) -> None:
    ac(ch).UpdateActionResult(re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result),
                              timeout=30)


@ALL_CONFIGS
def test_any_server_serves_what_another_stored(config: str, example_servers, s3_server: S3Server) -> None:
    first, second = example_servers(config)
    bucket = first.env["CASBAH_S3_BUCKET"]
    a, b = channel(first), channel(second)
    try:
        small = rand(1000)
        big = rand(3 * MiB + 5)  # past the 64 KiB routing threshold: an S3 object in both examples
        small_d = upload(a, [small])[0]
        big_d = sha(big)
        assert bs_write(a, write_name(big_d), big, chunk=256 * 1024).committed_size == len(big)

        assert missing(b, [small_d, big_d]) == set()
        absent = sha(rand(10))
        assert missing(b, [absent, big_d]) == {(absent.hash, absent.size_bytes)}
        read = cas(b).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[small_d]))
        assert [(r.status.code, r.data) for r in read.responses] == [(0, small)]
        assert bs_read(b, read_name(big_d)) == big
        assert bs_read(b, read_name(big_d), offset=MiB + 1, limit=100) == big[MiB + 1 : MiB + 101]
        # The large blob really is one S3 object under the examples' prefix.
        assert f"cas/{big_d.hash}-{big_d.size_bytes}" in bucket_keys(s3_server, bucket)

        action = sha(rand(64))
        result = re_pb2.ActionResult(exit_code=0, stdout_digest=small_d,
                                     output_files=[re_pb2.OutputFile(path="out/big", digest=big_d)])
        put_result(a, action, result)
        assert get_result(b, action) == result
        newer = re_pb2.ActionResult(exit_code=0, output_files=[re_pb2.OutputFile(path="o", digest=small_d)])
        put_result(b, action, newer)  # an overwrite through the other server is what both then see
        assert get_result(a, action) == newer

        uri = f"https://example.com/{uuid.uuid4()}.tar.gz"
        push_blob(a, uri, small_d, resource_type="application/x-tar")
        push_blob(b, uri, big_d, resource_type="application/x-tar", **{"vcs.commit": "abc"})
        # Most recently pushed first, whichever server saw the push.
        assert fetch_blob(a, uri).blob_digest == big_d
        assert fetch_blob(b, uri, resource_type="application/x-tar").blob_digest == big_d
        # An exact qualifier set still finds the older asset.
        got = fetch_blob(b, uri, **{"vcs.commit": "abc"})
        assert (got.status.code, got.blob_digest) == (0, big_d)
        assert fetch_blob(a, uri + "x").status.code == grpc.StatusCode.NOT_FOUND.value[0]
    finally:
        a.close()
        b.close()


def _expect_unavailable(call, name_in_message: str, secret: str | None = None) -> str:
    err = rpc_error(call)
    assert err.code() == UNAVAILABLE, (err.code(), err.details())
    assert name_in_message in err.details(), err.details()
    if secret:
        assert secret not in err.details()
    return err.details()


def _wait_ok(call, timeout: float = 30.0):
    """Retry `call` on UNAVAILABLE (as clients do) until it succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_redis_outage_is_unavailable_and_loses_nothing(example_servers, private_redis: RedisServer) -> None:
    """Killing Redis (SIGKILL: a crash) makes what needs it UNAVAILABLE naming it; after a
    restart on the same AOF everything acknowledged before the kill is served again."""
    (server,) = example_servers("s3-redis", count=1, redis=private_redis)
    ch = channel(server)
    try:
        small = rand(500)
        small_d = upload(ch, [small])[0]
        action = sha(rand(64))
        result = re_pb2.ActionResult(exit_code=3, stdout_digest=small_d)
        put_result(ch, action, result)
        uri = f"https://example.com/{uuid.uuid4()}"
        push_blob(ch, uri, small_d)

        private_redis.kill()
        where = f"Redis at redis://127.0.0.1:{private_redis.port}/0"
        _expect_unavailable(lambda: get_result(ch, action), where)
        _expect_unavailable(lambda: put_result(ch, sha(rand(9)), result), where)
        _expect_unavailable(lambda: push_blob(ch, uri + "/2", small_d), where)
        _expect_unavailable(lambda: cas(ch).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[small_d]),
                                                           timeout=30), where)
        _expect_unavailable(lambda: missing(ch, [small_d]), where)
        # An index that cannot answer is the server's problem, not a miss: an RPC error clients retry.
        _expect_unavailable(lambda: fetch_blob(ch, uri), where)

        private_redis.start()
        assert _wait_ok(lambda: get_result(ch, action)) == result
        assert fetch_blob(ch, uri).blob_digest == small_d
        read = cas(ch).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[small_d]))
        assert read.responses[0].data == small
        later = sha(rand(64))
        put_result(ch, later, result)
        assert get_result(ch, later) == result
    finally:
        ch.close()


def test_postgres_outage_is_unavailable_and_loses_nothing(example_servers,
                                                          private_postgres: PostgresServer) -> None:
    """The same for PostgreSQL (ActionCache, asset index and blob index); its URL is
    named with the password masked."""
    (server,) = example_servers("s3-postgres", count=1, postgres=private_postgres)
    ch = channel(server)
    try:
        blob = rand(500)
        blob_d = upload(ch, [blob])[0]
        action = sha(rand(64))
        result = re_pb2.ActionResult(exit_code=0, output_files=[re_pb2.OutputFile(path="a", digest=blob_d)])
        put_result(ch, action, result)
        uri = f"https://example.com/{uuid.uuid4()}"
        push_blob(ch, uri, blob_d)
        assert missing(ch, [blob_d]) == set()

        private_postgres.kill()
        where = f"PostgreSQL at postgresql://casbah:***@127.0.0.1:{private_postgres.port}/casbah"
        started = time.monotonic()
        for call in (lambda: get_result(ch, action), lambda: put_result(ch, sha(rand(9)), result),
                     lambda: push_blob(ch, uri + "/2", blob_d), lambda: missing(ch, [blob_d])):
            _expect_unavailable(call, where, secret="secret")
        assert time.monotonic() - started < 20, "UNAVAILABLE should come at once, not after a pool timeout"
        _expect_unavailable(lambda: fetch_blob(ch, uri), where, secret="secret")
        # A blob read needs only S3: it goes on working.
        assert bs_read(ch, read_name(blob_d)) == blob

        private_postgres.start()
        assert _wait_ok(lambda: get_result(ch, action)) == result
        assert fetch_blob(ch, uri).blob_digest == blob_d
        assert missing(ch, [blob_d]) == set()
        later_blob = rand(700)
        later_d = upload(ch, [later_blob])[0]
        assert missing(ch, [later_d]) == set()
    finally:
        ch.close()


# --------------------------------------------------------------------------- --workers


def _worker_pids(parent: int) -> set[int]:
    """The supervisor's worker processes (multiprocessing also spawns a resource tracker)."""
    workers = set()
    for child in psutil.Process(parent).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                workers.add(child.pid)
        except psutil.Error:
            pass
    return workers


def _connection_owners(port: int) -> list[int]:
    """Pids owning the server side of established connections to `port` (ss -p)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    return [int(pid) for pid in re.findall(r"pid=(\d+)", out)]


def _listeners(port: int) -> set[int]:
    """Pids with a listening socket on `port` (a worker counts once it has bound, not once it exists)."""
    out = subprocess.run(["ss", "-Htlnp", f"( sport = :{port} )"], capture_output=True, text=True, check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def test_workers_share_the_port_and_the_state(example_servers, postgres_server: PostgresServer) -> None:
    """`--workers 2` on the S3 + PostgreSQL example: the kernel spreads connections over
    both worker processes, and what one worker stored every other serves."""
    (server,) = example_servers("s3-postgres", count=1, postgres=postgres_server, args=("--workers", "2"))
    deadline = time.monotonic() + 30
    while len(workers := _worker_pids(server.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(workers) == 2, workers
    # Under load the second worker may still be starting: connections made before it
    # binds all go to the first, which says nothing about SO_REUSEPORT.
    while not workers <= _listeners(server.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers <= _listeners(server.port), (workers, _listeners(server.port))
    channels = [channel(server) for _ in range(24)]
    try:
        blobs = [rand(100 + i) for i in range(len(channels))]
        digests = []
        for ch, data in zip(channels, blobs, strict=True):  # each on its own connection
            digests += upload(ch, [data])
        action = sha(rand(64))
        result = re_pb2.ActionResult(exit_code=0, output_files=[re_pb2.OutputFile(path="x", digest=digests[0])])
        put_result(channels[0], action, result)
        owners = _connection_owners(server.port)
        assert len(owners) >= len(channels), owners
        assert set(owners) == workers, f"connections by pid: {owners}, workers {workers}"
        for ch in channels:  # whichever worker owns the connection, it sees everything
            assert missing(ch, digests) == set()
            assert get_result(ch, action) == result
    finally:
        for ch in channels:
            ch.close()
    assert server.stop() == 0
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
               for pid in workers)


def _serve(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "casbah", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_workers_refuse_process_local_storage(tmp_path: Path) -> None:
    config = tmp_path / "memory.yaml"
    config.write_text('storages:\n  hot: {kind: memory, max-size: 1G}\n'
                      'instances:\n  "":\n    storage: {kind: cache, fast: hot, slow: {kind: disk, path: '
                      f'"{tmp_path / "cas"}"}}}}\n    asset-index: memory\n')
    proc = _serve(["--config", str(config), "--workers", "2", "--listen", "127.0.0.1:0",
                   "--data-dir", str(tmp_path / "d")])
    assert proc.returncode != 0
    assert "--workers 2" in proc.stderr, proc.stderr
    assert "storages.hot (kind memory)" in proc.stderr, proc.stderr
    assert "instances.''.asset-index (memory)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_workers_refuse_a_port_in_use(tmp_path: Path, s3_server: S3Server, postgres_server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = example_env(s3_server, postgres=postgres_server)
        proc = _serve(["--config", str(CONFIGS["s3-postgres"]), "--workers", "2", "--listen", f"127.0.0.1:{port}",
                       "--data-dir", str(tmp_path / "d")], env=env)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # Port 0 would give each worker a different port: refused too.
    proc = _serve(["--config", str(CONFIGS["s3-postgres"]), "--workers", "2", "--listen", "127.0.0.1:0",
                   "--data-dir", str(tmp_path / "d")], env=env)
    assert proc.returncode != 0 and "give a fixed port" in proc.stderr, proc.stderr


def test_workers_supervisor_restarts_a_dead_worker(example_servers, postgres_server: PostgresServer) -> None:
    """docs/deployment.md: a worker that dies is restarted while the others keep serving."""
    (server,) = example_servers("s3-postgres", count=1, postgres=postgres_server, args=("--workers", "2"))
    deadline = time.monotonic() + 30
    while len(before := _worker_pids(server.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _worker_pids(server.pid)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.1)
    assert len(now) == 2 and victim not in now, (before, now)
    data = rand(123)
    for _ in range(8):  # fresh connections land on either worker; all are served
        with channel(server) as ch:
            _wait_ok(lambda ch=ch: upload(ch, [data]))
            assert missing(ch, [sha(data)]) == set()


# --------------------------------------------------------------------------- Bazel

E2E_TESTS = Path(__file__).resolve().parent.parent / "e2e"
if str(E2E_TESTS) not in sys.path:
    sys.path.insert(0, str(E2E_TESTS))

from test_bazel import (  # noqa: E402  (the e2e helpers: workspace, offline stubs, summary checks)
    BAZEL,
    Bazel,
    assert_server_log_clean,
    check_outputs_identical,
    cold_build,
    hash_outputs,
    warm_build,
    write_stubs,
    write_workspace,
)


@pytest.mark.slow
@pytest.mark.skipif(BAZEL is None, reason="bazel is not installed (scripts/system-deps installs bazel-bootstrap)")
def test_bazel_builds_through_one_server_and_hits_through_another(example_servers, tmp_path: Path,
                                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """A cold build through one server uploads everything; after `clean --expunge` the same
    build through the other server is 100% remote cache hits with identical outputs.

    On the recommended topology (S3 + PostgreSQL) only: a Bazel round trip costs ~45 s
    here, and the S3 + Redis example serves the same RPCs, checked above with plain stubs."""
    first, second = example_servers("s3-postgres")
    bazel = Bazel(write_workspace(tmp_path / "ws"), tmp_path_factory.mktemp("bazel-root"),
                  write_stubs(tmp_path / "stubs"))
    cold_build(bazel, first.url)
    reference = hash_outputs(bazel.bin_dir)
    bazel.clean_expunge()
    warm_build(bazel, second.url)
    check_outputs_identical(bazel, reference)
    assert_server_log_clean(first)
    assert_server_log_clean(second)
