"""Several remotes for the local cache (issue 17): push to every push remote, pull from
the first that has the ref, refs found whichever way they were published, a read-only
remote refused before any upload, and a server without batch calls served over
ByteStream.  Real `casbah serve` processes over loopback throughout; the one injected
fault is the batch-less front (`NoBatches`), since casbah always serves batches."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import requests
from client_helpers import cli, small_tree

from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.reapi.channel import RemoteSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def awkward_tree(top: Path, variant: str) -> Path:
    """Executables, symlinks, empty dirs and a file big enough for ByteStream (3 MiB)."""
    small_tree(top, variant)
    (top / "bin").mkdir()
    tool = top / "bin" / "tool"
    tool.write_text(f"#!/bin/sh\necho {variant}\n")
    tool.chmod(0o755)
    (top / "bin" / "alias").symlink_to("tool")
    (top / "dir-link").symlink_to("src")
    (top / "empty" / "nested").mkdir(parents=True)
    (top / "big.bin").write_bytes(os.urandom(3 << 20))
    return top


def assert_checkout(source: Path, dest: Path) -> None:
    """Same paths, bytes and symlink targets, and the same executable bits."""
    proc = subprocess.run(["diff", "-r", "--no-dereference", str(source), str(dest)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    for path in source.rglob("*"):
        other = dest / path.relative_to(source)
        if path.is_symlink():
            assert other.is_symlink() and os.readlink(other) == os.readlink(path), path
        elif path.is_file():
            assert (path.stat().st_mode & 0o111) == (other.stat().st_mode & 0o111), path


def commit(cache_dir: Path, tree: Path, ref: str) -> str:
    return cli("cache", "commit", "--cache-dir", str(cache_dir), str(tree), "--ref", ref).stdout.strip()


def test_push_to_two_pull_with_first_down(start_server, tmp_path: Path) -> None:
    first, second = start_server(), start_server()
    tree = awkward_tree(tmp_path / "tree", "two")
    root = commit(tmp_path / "cache", tree, "demo/v1")
    config = tmp_path / "config.yaml"
    config.write_text(f"remotes:\n  - {{url: '{first.url}', push: true}}\n  - {{url: '{second.url}', push: true}}\n"
                      f"cache-dir: {tmp_path / 'cache'}\n")
    env = {"CASBAH_CONFIG": str(config)}
    pushed = cli("cache", "push", "demo/v1", env=env)
    assert pushed.stdout.strip() == root
    assert f"to {first.url}" in pushed.stderr and f"to {second.url}" in pushed.stderr

    first.stop()
    fresh = tmp_path / "fresh"
    pulled = cli("cache", "pull", "--cache-dir", str(fresh), "demo/v1", "--checkout", str(tmp_path / "out"), env=env)
    assert pulled.stdout.strip() == root
    assert f"from {second.url}" in pulled.stderr
    assert f"note: {first.url} did not serve" in pulled.stderr
    assert_checkout(tree, tmp_path / "out")


def test_push_reports_each_remote_and_fails_if_one_failed(start_server, tmp_path: Path) -> None:
    good = start_server()
    down = f"grpc://127.0.0.1:{free_port()}"
    tree = awkward_tree(tmp_path / "tree", "partial")
    root = commit(tmp_path / "cache", tree, "part/v1")
    out = cli("cache", "push", "--cache-dir", str(tmp_path / "cache"), "--remote", down, "--remote", good.url,
              "part/v1", expect=1)
    assert f"Error: push to {down} failed" in out.stderr
    assert f"to {good.url}" in out.stderr  # the good remote was still pushed
    assert "Traceback" not in out.stderr
    with RemoteClient(RemoteSpec(good.url)) as client:
        assert client.fetch_directory(["urn:casbah:ref:part/v1"]) == Digest.parse(root)


def test_ref_published_one_way_is_pulled_the_other(start_server, tmp_path: Path) -> None:
    server = start_server()
    cache = tmp_path / "cache"
    as_asset = commit(cache, awkward_tree(tmp_path / "a", "asset"), "pub/asset")
    as_reference = commit(cache, awkward_tree(tmp_path / "r", "reference"), "pub/reference")
    remote = ["--remote", server.url]
    cli("cache", "push", "--cache-dir", str(cache), *remote, "--publish", "asset", "pub/asset")
    cli("cache", "push", "--cache-dir", str(cache), *remote, "--publish", "references", "pub/reference")

    out = cli("cache", "pull", "--cache-dir", str(tmp_path / "f1"), *remote, "--publish", "references", "pub/asset")
    assert out.stdout.strip() == as_asset
    out = cli("cache", "pull", "--cache-dir", str(tmp_path / "f2"), *remote, "--publish", "asset", "pub/reference")
    assert out.stdout.strip() == as_reference
    missing = cli("cache", "pull", "--cache-dir", str(tmp_path / "f3"), *remote, "pub/none", expect=None)
    assert missing.code != 0 and "no ref 'pub/none'" in missing.stderr


def _write_calls(metrics_url: str) -> list[str]:
    text = requests.get(metrics_url, timeout=10).text
    return [line for line in text.splitlines() if line.startswith("casbah_grpc_requests_total")
            and re.search(r'method="(BatchUpdateBlobs|Write|PushDirectory|UpdateReference)"', line)]


def test_push_to_read_only_remote_fails_before_uploading(start_server, tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text('instances: {"": {read-only: true}}\n')
    metrics = free_port()
    server = start_server(["--config", str(config), "--metrics-listen", f"127.0.0.1:{metrics}"])
    commit(tmp_path / "cache", awkward_tree(tmp_path / "tree", "ro"), "ro/v1")
    out = cli("cache", "push", "--cache-dir", str(tmp_path / "cache"), "--remote", server.url, "ro/v1", expect=1)
    error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "does not accept updates" in error[0], out.stderr
    assert _write_calls(f"http://127.0.0.1:{metrics}/metrics") == []


class NoBatches(grpc.GenericRpcHandler):
    """The injected fault: a front that answers UNIMPLEMENTED to BatchReadBlobs and
    BatchUpdateBlobs (as batch-less proxies do) and relays every other call to a real
    casbah server.  Counts the batch calls it refused."""

    BATCHES = ("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
               "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs")

    def __init__(self, upstream: grpc.Channel) -> None:
        self.upstream = upstream
        self.refused: list[str] = []

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method
        if method in self.BATCHES:
            def refuse(request, context):
                self.refused.append(method.rsplit("/", 1)[1])
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "no batch calls here")
            return grpc.unary_unary_rpc_method_handler(refuse)
        if method in ("/google.bytestream.ByteStream/Read",
                      "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree"):
            call = self.upstream.unary_stream(method)
            return grpc.unary_stream_rpc_method_handler(lambda request, context: _relay(call(request), context))
        if method == "/google.bytestream.ByteStream/Write":
            call = self.upstream.stream_unary(method)
            return grpc.stream_unary_rpc_method_handler(lambda requests, context: _unary(call, requests, context))
        call = self.upstream.unary_unary(method)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: _unary(call, request, context))


def _relay(responses, context: grpc.ServicerContext):
    try:
        yield from responses
    except grpc.RpcError as exc:
        context.abort(exc.code(), exc.details())


def _unary(call, request, context: grpc.ServicerContext):
    try:
        return call(request)
    except grpc.RpcError as exc:
        context.abort(exc.code(), exc.details())


@pytest.fixture
def batchless(start_server):
    server = start_server(["--services", "capabilities,bytestream,asset,references,cas"])
    upstream = grpc.insecure_channel(server.address)
    handler = NoBatches(upstream)
    front = grpc.server(futures.ThreadPoolExecutor(8), handlers=[handler])
    port = front.add_insecure_port("127.0.0.1:0")
    front.start()
    yield f"grpc://127.0.0.1:{port}", handler
    front.stop(None)
    upstream.close()


def test_batchless_server_is_served_over_bytestream(batchless, tmp_path: Path) -> None:
    url, front = batchless
    tree = awkward_tree(tmp_path / "tree", "batchless")
    root = commit(tmp_path / "cache", tree, "nb/v1")
    cli("cache", "push", "--cache-dir", str(tmp_path / "cache"), "--remote", url, "nb/v1")
    assert front.refused == ["BatchUpdateBlobs"]  # asked once; ByteStream for the rest of the connection
    out = cli("cache", "pull", "--cache-dir", str(tmp_path / "fresh"), "--remote", url, "nb/v1",
              "--checkout", str(tmp_path / "out"))
    assert out.stdout.strip() == root
    assert front.refused == ["BatchUpdateBlobs", "BatchReadBlobs"]
    assert_checkout(tree, tmp_path / "out")


def test_streamed_blob_reports_progress_per_chunk(server, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(40 << 20))  # chunked on upload (8 MiB groups), streamed on download
    digest = Digest.of(big.read_bytes())
    sent: list[tuple[int, int]] = []
    received: list[tuple[int, int]] = []
    with RemoteClient(RemoteSpec(server.url)) as client:
        client.upload({digest: big}, lambda blobs, nbytes: sent.append((blobs, nbytes)))
        client.download([digest], lambda d, chunks: [None for _ in chunks],
                        lambda blobs, nbytes: received.append((blobs, nbytes)))
    for calls in (sent, received):
        assert sum(n for _, n in calls) == digest.size and sum(b for b, _ in calls) == 1
        assert len([n for _, n in calls if 0 < n < digest.size]) >= 4, calls  # moves before the blob is done


def test_client_config_refuses_unknown_keys(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("remotes:\n  - {url: 'grpc://127.0.0.1:1', pushh: true}\n")
    out = cli("cache", "pull", "--cache-dir", str(tmp_path / "c"), "x", env={"CASBAH_CONFIG": str(config)},
              expect=None)
    assert out.code != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"Error: client config {config}: remotes.0.pushh: unknown key"]
    config.write_text("remotes: [{url: 'grpc://127.0.0.1'}]\n")
    out = cli("cache", "ls", env={"CASBAH_CONFIG": str(config)}, expect=None)
    assert out.code != 0 and "needs a port" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_push_with_a_read_only_token_fails_before_uploading(start_server, tmp_path: Path) -> None:
    """ReferenceStorage's Status speaks for the instance, not the caller: a read-only token
    is found out by the empty-blob write, before any real blob is sent."""
    token = "read-only-token-for-this-test"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"sha256:{hashlib.sha256(token.encode()).hexdigest()} read\n")
    (tmp_path / "token").write_text(token)
    metrics = free_port()
    server = start_server(["--tokens", str(tokens), "--metrics-listen", f"127.0.0.1:{metrics}"])
    commit(tmp_path / "cache", awkward_tree(tmp_path / "tree", "token"), "tok/v1")
    out = cli("cache", "push", "--cache-dir", str(tmp_path / "cache"), "--remote", server.url, "--token-file",
              str(tmp_path / "token"), "tok/v1", expect=1)
    error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "does not accept uploads" in error[0], out.stderr
    calls = _write_calls(f"http://127.0.0.1:{metrics}/metrics")
    # At most the one refused empty-blob probe (whether a call refused by auth is counted
    # is the server's business); never a batch or a blob.
    assert all('method="Write"' in c and 'code="PERMISSION_DENIED"' in c and c.endswith(" 1.0") for c in calls), calls
