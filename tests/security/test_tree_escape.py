"""Issue 11, rows 1 and 2: a hostile tree must never make a client write outside its
destination, and symlinks leaving the tree are written only on request.

The hostile trees are planted past any server-side tree check, as an attacker with
write access to the CAS (or a compromised server) could: Directory blobs uploaded
with BatchUpdateBlobs (CAS stores bytes, it does not vouch for trees), straight into
a local cache's objects, and for `source fetch` a Remote Asset front that answers
FetchDirectory with the hostile root while passing everything else through to a real
`casbah serve` (the compromised-server case)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from casbah.cli import main
from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.local import LocalCache
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.reapi.channel import RemoteSpec

ROOT = Path(__file__).resolve().parent.parent.parent
VICTIM = "../../../../victim.txt"
COMMANDS = ("cache checkout", "cache pull --checkout", "cas download", "source fetch", "source fetch-all")


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    conftest = request.config.pluginmanager.get_plugin(str(ROOT / "tests" / "conftest.py"))
    process = conftest.ServerProcess(tmp_path_factory.mktemp("casbah") / "data").start()
    yield process
    process.stop()


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stderr


def hostile_tree(client: RemoteClient, spec: dict) -> Digest:
    """Upload a tree built from `{name: bytes | ("->", target) | {…}}` with BatchUpdateBlobs only."""
    d = re_pb2.Directory()
    blobs: dict[Digest, bytes] = {}
    for name, value in spec.items():
        if isinstance(value, dict):
            child = hostile_tree(client, value)
            d.directories.add(name=name, digest=re_pb2.Digest(hash=child.hash, size_bytes=child.size))
        elif isinstance(value, tuple):
            d.symlinks.add(name=name, target=value[1])
        else:
            blob = Digest.of(value)
            blobs[blob] = value
            d.files.add(name=name, digest=re_pb2.Digest(hash=blob.hash, size_bytes=blob.size))
    data = d.SerializeToString()
    root = Digest.of(data)
    blobs[root] = data
    client.upload(blobs)
    return root


class HostileAssets(grpc.GenericRpcHandler):
    """FetchDirectory answers `root` for any URI; every other call goes to the real server."""

    def __init__(self, upstream: grpc.Channel, root: Digest) -> None:
        self.upstream = upstream
        self.root = root

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method
        if method == "/build.bazel.remote.asset.v1.Fetch/FetchDirectory":
            answer = ra_pb2.FetchDirectoryResponse(
                root_directory_digest=re_pb2.Digest(hash=self.root.hash, size_bytes=self.root.size))
            return grpc.unary_unary_rpc_method_handler(lambda request, context: answer.SerializeToString())
        if method in ("/google.bytestream.ByteStream/Read", "/build.bazel.remote.execution.v2."
                      "ContentAddressableStorage/GetTree"):
            call = self.upstream.unary_stream(method)
            return grpc.unary_stream_rpc_method_handler(lambda request, context: _relay(call(request), context))
        if method == "/google.bytestream.ByteStream/Write":
            call = self.upstream.stream_unary(method)
            return grpc.stream_unary_rpc_method_handler(lambda requests, context: call(requests))
        call = self.upstream.unary_unary(method)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: call(request))


def _relay(responses, context: grpc.ServicerContext):
    """Pass a streamed answer on, and the upstream's error status with it (the real server
    refuses the hostile tree in GetTree with FAILED_PRECONDITION)."""
    try:
        yield from responses
    except grpc.RpcError as exc:
        context.abort(exc.code(), exc.details())


@pytest.fixture
def world(tmp_path: Path, server) -> Iterator:
    """A victim file next to the work area, a client, and a way to run each command."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    cache_dir = tmp_path / "cache"
    upstream = grpc.insecure_channel(server.address)
    fronts: list[grpc.Server] = []

    def run(command: str, root: Digest, *extra: str) -> tuple[int, str, Path]:
        dest = work / "dest"
        if command == "cache checkout":
            # straight into a local cache's objects, as a poisoned cache would hold it
            local = LocalCache(cache_dir)
            with RemoteClient(RemoteSpec(server.url)) as client:
                for digest in _tree_blobs(client, root):
                    local.add_verified(digest, client.read_bytes(digest))
            code, err = cli("cache", "checkout", "--cache-dir", str(cache_dir), str(root), str(dest), *extra)
        elif command == "cache pull --checkout":
            code, err = cli("cache", "pull", "--cache-dir", str(cache_dir), "--remote", server.url, str(root),
                            "--checkout", str(dest), *extra)
        elif command == "cas download":
            code, err = cli("cas", "download", "--remote", server.url, str(root), "-o", str(dest), "--tree", *extra)
        else:
            front = grpc.server(futures.ThreadPoolExecutor(4), handlers=[HostileAssets(upstream, root)])
            port = front.add_insecure_port("127.0.0.1:0")
            front.start()
            fronts.append(front)
            url = f"grpc://127.0.0.1:{port}"
            sha = hashlib.sha256(b"never fetched").hexdigest()
            if command == "source fetch":
                code, err = cli("source", "fetch", "--cache-dir", str(cache_dir), "--remote", url, "--asset-fetch",
                                "only", "--kind", "tar", "--uri", "http://127.0.0.1:9/x.tar", "--sha256", sha,
                                str(dest), *extra)
            else:
                manifest = work.parent.parent.parent / "manifest.yaml"
                manifest.write_text(f"remotes: [{{url: '{url}', asset-fetch: only}}]\n"
                                    f"sources: [{{kind: tar, url: 'http://127.0.0.1:9/x.tar', sha256: {sha}, "
                                    f"directory: dest}}]\n")
                code, err = cli("source", "fetch-all", "--cache-dir", str(cache_dir), str(manifest), str(work),
                                *extra)
                dest = work / "dest"
        return code, err, dest

    with RemoteClient(RemoteSpec(server.url)) as client:
        yield client, victim, run
    for front in fronts:
        front.stop(None)
    upstream.close()


def _tree_blobs(client: RemoteClient, root: Digest) -> list[Digest]:
    directory = re_pb2.Directory.FromString(client.read_bytes(root))
    out = [root, *(Digest(n.digest.hash, n.digest.size_bytes) for n in directory.files if n.digest.size_bytes)]
    for node in directory.directories:
        out.extend(_tree_blobs(client, Digest(node.digest.hash, node.digest.size_bytes)))
    return out


def _outside(tmp_path: Path) -> set[str]:
    """Every path under tmp_path but outside the work area and the cache."""
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
            if not str(p.relative_to(tmp_path)).startswith(("a/b/c", "cache", "manifest"))}


@pytest.mark.parametrize("command", COMMANDS)
def test_row1_a_tree_naming_paths_outside_is_refused(tmp_path: Path, world, command: str) -> None:
    client, victim, run = world
    root = hostile_tree(client, {"ok.txt": b"fine", VICTIM: b"OVERWRITTEN", "d": {"../ESCAPED_DIR": {"f": b"x"}}})
    before = _outside(tmp_path)
    code, err, dest = run(command, root)
    assert code != 0, err
    assert "victim.txt" in err, err
    assert len(err.strip().splitlines()) <= 2, err  # one error line (fetch-all adds its summary line)
    assert victim.read_text() == "precious"
    assert _outside(tmp_path) == before, "nothing may be created outside the destination"
    assert not any(dest.rglob("*")) if dest.exists() else True, "nothing half-written in the destination"


@pytest.mark.parametrize("command", COMMANDS)
def test_row1_a_directory_named_parent_is_refused(tmp_path: Path, world, command: str) -> None:
    client, _, run = world
    root = hostile_tree(client, {"../ESCAPED_DIR": {"f": b"escaped"}, "d": {"../../ESCAPED_TOO": {}}})
    code, err, _ = run(command, root)
    assert code != 0 and "ESCAPED_DIR" in err, err
    assert not list(tmp_path.rglob("ESCAPED_*"))


@pytest.mark.parametrize("command", COMMANDS)
def test_row2_links_out_of_the_tree_only_on_request(tmp_path: Path, world, command: str) -> None:
    client, _, run = world
    root = hostile_tree(client, {"etc": ("->", "/etc"), "up": ("->", "../../../.."), "f": b"content of f"})
    code, err, dest = run(command, root)
    assert code != 0, err
    assert "'etc'" in err or "'up'" in err, err
    assert not (dest / "etc").is_symlink() and not (dest / "up").is_symlink()
    code, err, dest = run(command, root, "--allow-external-symlinks")
    assert code == 0, err
    assert (dest / "etc").readlink() == Path("/etc")
    assert (dest / "up").readlink() == Path("../../../..")
    assert (dest / "f").read_bytes() == b"content of f"
