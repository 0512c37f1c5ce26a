"""`casbah serve` as an operator runs it: defaults, port clashes, shutdown, config files and flags.

What a first-time user meets: `casbah serve` with no arguments must just work,
mistakes (a busy port, a typo in the config) must stop the server at once with a
message naming the problem, and SIGTERM (systemd, Kubernetes) must not cut off
uploads in flight.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from server_test_helpers import (
    OPTIONS,
    bs,
    bs_read,
    caps,
    missing,
    rand,
    read_name,
    rpc_error,
    sha,
    upload,
    write_name,
    write_requests,
)

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 1 << 20


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "casbah", "serve", *args]


def run_to_exit(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a `casbah serve` that is expected to fail at startup (a hang is a failure too)."""
    return subprocess.run(serve_cmd(*args), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def get_caps(address: str, instance: str = "") -> re_pb2.ServerCapabilities:
    with grpc.insecure_channel(address) as channel:
        return caps(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=instance), timeout=10)


def test_serve_with_no_arguments(tmp_path: Path) -> None:
    """No flags: 127.0.0.1:50051, data under ./casbah-data, the address printed, clean exit on SIGTERM."""
    if not port_is_free(50051):
        pytest.skip("port 50051 is in use on this machine; the default listen address cannot be tested")
    proc = subprocess.Popen(serve_cmd(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 30
        while "grpc://" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"casbah exited with {proc.returncode}: {proc.stderr.read()}")
        assert "grpc://127.0.0.1:50051" in line
        assert (tmp_path / "casbah-data").is_dir()
        assert (tmp_path / "casbah-data" / "cas").is_dir() and (tmp_path / "casbah-data" / "ac").is_dir()
        assert get_caps("127.0.0.1:50051").cache_capabilities.max_batch_total_size_bytes > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_port_in_use_fails_at_startup(start_server, tmp_path: Path) -> None:
    """A second server on a busy port must exit non-zero naming the address, not share the port (SO_REUSEPORT)."""
    first = start_server()
    result = run_to_exit(["--listen", first.address, "--data-dir", str(tmp_path / "second")], cwd=tmp_path)
    assert result.returncode != 0
    assert first.address in result.stderr and "listen" in result.stderr
    assert "Traceback" not in result.stderr
    # The first server is unaffected.
    assert get_caps(first.address).cache_capabilities.max_batch_total_size_bytes > 0


def test_sigterm_drains_an_upload_in_flight(start_server, tmp_path: Path) -> None:
    """SIGTERM mid-upload: the upload completes, the server exits 0, and the blob survives a restart."""
    server = start_server(data_dir=tmp_path / "data")
    data = rand(24 * MiB)
    name = write_name(sha(data))
    signalled = threading.Event()

    def requests():
        for i, request in enumerate(write_requests(name, data, chunk=MiB)):
            if i == 8:
                os.kill(server.pid, signal.SIGTERM)
                signalled.set()
            if i >= 8:
                time.sleep(0.01)  # keep the upload in flight while the server drains
            yield request

    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        response = bs(channel).Write(requests(), timeout=60)
    assert signalled.is_set()
    assert response.committed_size == len(data)
    done = time.monotonic()
    assert server.proc.wait(30) == 0
    assert time.monotonic() - done < 10  # drained, not waiting out the 30 s grace period
    assert "stopped" in server.log()
    server.start()
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        assert bs_read(channel, read_name(sha(data))) == data


@pytest.mark.parametrize(("config", "key"), [
    ("listen: ['127.0.0.1:0']\nbogus-key: 1\n", "bogus-key"),
    ('instances: {"": {check-action-result: false}}\n', "check-action-result"),
    ("storages: {default: {kind: disk, path: /tmp/x, max-sise: 1G}}\n", "max-sise"),
    ("quota: lots\n", "quota"),
], ids=["top-level", "instance", "storage-node", "bad-value"])
def test_config_error_names_the_key(tmp_path: Path, config: str, key: str) -> None:
    """A typo in the config stops the server with a message naming the offending key."""
    path = tmp_path / "casbah.yaml"
    path.write_text(config)
    result = run_to_exit(["--config", str(path), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")],
                         cwd=tmp_path)
    assert result.returncode != 0
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_config_env_expansion(start_server, tmp_path: Path) -> None:
    """`${VAR}` and `${VAR:-default}` are expanded in config values."""
    path = tmp_path / "casbah.yaml"
    path.write_text(
        "max-batch-size: ${CASBAH_TEST_BATCH}\n"
        'instances: {"": {read-only: "${CASBAH_TEST_READ_ONLY:-false}"}}\n'
    )
    env = {"CASBAH_TEST_BATCH": "1M"}
    server = start_server(["--config", str(path)], env=env)
    cache = get_caps(server.address).cache_capabilities
    assert cache.max_batch_total_size_bytes == 1 << 20
    assert cache.action_cache_update_capabilities.update_enabled  # the default applied
    server = start_server(["--config", str(path)], env={**env, "CASBAH_TEST_READ_ONLY": "true"})
    assert not get_caps(server.address).cache_capabilities.action_cache_update_capabilities.update_enabled


def test_config_unset_variable(tmp_path: Path) -> None:
    """An unset variable without a default is an error naming the variable, not an empty string."""
    path = tmp_path / "casbah.yaml"
    path.write_text("max-batch-size: ${CASBAH_TEST_SURELY_UNSET}\n")
    env = {k: v for k, v in os.environ.items() if k != "CASBAH_TEST_SURELY_UNSET"}
    result = subprocess.run(serve_cmd("--config", str(path), "--listen", "127.0.0.1:0", "--data-dir",
                                      str(tmp_path / "d")), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0
    assert "CASBAH_TEST_SURELY_UNSET" in result.stderr


def test_instance_flag_adds_names(start_server) -> None:
    """--instance adds names served from the same storage as the default instance."""
    server = start_server(["--instance", "foo", "--instance", "x/y"])
    assert "'foo'" in server.log() and "'x/y'" in server.log() and f"grpc://{server.address}" in server.log()
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        for name in ("", "foo", "x/y"):
            assert caps(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=name))
        error = rpc_error(lambda: caps(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="bar")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert all(n in error.details() for n in ("'foo'", "'x/y'", "''"))
        blob = rand(100)
        upload(channel, [blob], instance="foo")
        assert missing(channel, [sha(blob)], instance="x/y") == set()
        assert bs_read(channel, read_name(sha(blob), instance="")) == blob
