"""The HTTP front against a real `casbah serve --http-listen` on loopback (requests + gRPC clients).

Bazel's protocol (`/cas/`, `/ac/` under an instance prefix), the opaque namespace (ccache
layouts, sccache's WebDAV verbs), interplay with gRPC, the access table, a large PUT with
bounded server memory.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import requests
import yaml
import zstandard
from server_test_helpers import OPTIONS

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def front(module_server_factory, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """(HTTP base URL, server) with instances '', 'team-a' and 'a/b/c'."""
    port = free_port()
    server = module_server_factory(["--instance", "team-a", "--instance", "a/b/c",
                                    "--http-listen", f"127.0.0.1:{port}"])
    yield f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def chan(front) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(front[1].address, options=OPTIONS) as ch:
        yield ch


def test_cas_put_get_head_under_prefixes(front) -> None:
    base, _ = front
    for prefix in ("", "/team-a", "/a/b/c"):
        data = os.urandom(3000)
        url = f"{base}{prefix}/cas/{sha(data)}"
        assert requests.head(url).status_code == 404
        assert requests.get(url).status_code == 404
        assert requests.put(url, data=data).status_code == 200
        head = requests.head(url)
        assert head.status_code == 200 and head.headers["Content-Length"] == "3000"
        got = requests.get(url)
        assert got.status_code == 200 and got.content == data
    # Instances are separate stores' names: a blob PUT under team-a is not in '' by prefix routing alone,
    # but all three share the default storage here, so presence is shared; an unknown prefix is a 404.
    assert requests.get(f"{base}/nope/cas/{sha(b'x')}").status_code == 404
    assert "no instance 'nope'" in requests.get(f"{base}/nope/cas/{sha(b'x')}").text


def test_cas_mismatch_is_400_and_nothing_stored(front, chan) -> None:
    base, _ = front
    data = os.urandom(1000)
    wrong = sha(data[:-1] + b"!")
    response = requests.put(f"{base}/cas/{wrong}", data=data)
    assert response.status_code == 400, response.text
    assert requests.head(f"{base}/cas/{wrong}").status_code == 404
    missing = re_grpc.ContentAddressableStorageStub(chan).FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[re_pb2.Digest(hash=wrong, size_bytes=1000)]))
    assert len(missing.missing_blob_digests) == 1
    # A wrong body for a blob already stored is refused too (nothing is written either way).
    good = os.urandom(500)
    assert requests.put(f"{base}/cas/{sha(good)}", data=good).status_code == 200
    assert requests.put(f"{base}/cas/{sha(good)}", data=os.urandom(500)).status_code == 400
    assert requests.put(f"{base}/cas/{'zz' * 32}", data=good).status_code == 400  # not hex


def test_cas_range(front) -> None:
    base, _ = front
    data = bytes(range(256)) * 20
    url = f"{base}/cas/{sha(data)}"
    requests.put(url, data=data).raise_for_status()
    part = requests.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert requests.get(url, headers={"Range": "bytes=5000-"}).content == data[5000:]
    assert requests.get(url, headers={"Range": "bytes=-7"}).content == data[-7:]
    assert requests.get(url, headers={"Range": "bytes=100-999999"}).content == data[100:]
    unsatisfiable = requests.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["Content-Range"] == f"bytes */{len(data)}"
    assert requests.get(url, headers={"Range": "bytes=9-3"}).status_code == 400


def test_cas_zstd_and_chunked_bodies(front) -> None:
    base, _ = front
    data = b"compressible " * 10000
    url = f"{base}/cas/{sha(data)}"
    body = zstandard.ZstdCompressor().compress(data)
    assert requests.put(url, data=body, headers={"Content-Encoding": "zstd"}).status_code == 200
    raw = requests.get(url, headers={"Accept-Encoding": "zstd"}, stream=True)
    assert raw.headers["Content-Encoding"] == "zstd"
    assert zstandard.ZstdDecompressor().decompressobj().decompress(raw.raw.read()) == data
    assert requests.get(url, headers={"Accept-Encoding": "gzip"}).content == data
    # A zstd body that expands to other bytes: 400.
    other = zstandard.ZstdCompressor().compress(data + b"!")
    assert requests.put(url.replace(sha(data), sha(b"y" * 9)), data=other,
                        headers={"Content-Encoding": "zstd"}).status_code == 400
    # Chunked (no Content-Length): spooled, verified, stored.
    chunked = os.urandom(3 * MiB + 17)
    response = requests.put(f"{base}/cas/{sha(chunked)}", data=iter([chunked[:MiB], chunked[MiB:]]))
    assert response.status_code == 200
    assert requests.get(f"{base}/cas/{sha(chunked)}").content == chunked
    assert requests.put(f"{base}/cas/{sha(chunked)}", data=iter([chunked[1:]])).status_code == 400
    assert requests.put(url, data=b"x", headers={"Content-Encoding": "br"}).status_code == 415


def test_http_and_grpc_see_the_same_blobs(front, chan) -> None:
    base, _ = front
    stub = bs_grpc.ByteStreamStub(chan)
    data = os.urandom(70000)
    requests.put(f"{base}/a/b/c/cas/{sha(data)}", data=data).raise_for_status()
    read = stub.Read(bs_pb2.ReadRequest(resource_name=f"a/b/c/blobs/{sha(data)}/{len(data)}"))
    assert b"".join(r.data for r in read) == data
    # Written over gRPC, found over HTTP by hash alone (the disk store looks the size up).
    other = os.urandom(90000)
    stub.Write(iter([bs_pb2.WriteRequest(resource_name=f"uploads/{uuid.uuid4()}/blobs/{sha(other)}/{len(other)}",
                                         data=other, finish_write=True)]))
    assert requests.get(f"{base}/cas/{sha(other)}").content == other
    assert requests.head(f"{base}/cas/{sha(other)}").headers["Content-Length"] == str(len(other))


def _action_result(output: bytes) -> re_pb2.ActionResult:
    return re_pb2.ActionResult(output_files=[re_pb2.OutputFile(
        path="out.o", digest=re_pb2.Digest(hash=sha(output), size_bytes=len(output)))], exit_code=0)


def test_ac_action_results_are_checked_and_shared_with_grpc(front, chan) -> None:
    base, _ = front
    output = os.urandom(2000)
    result = _action_result(output).SerializeToString(deterministic=True)
    action = sha(os.urandom(32))
    url = f"{base}/team-a/ac/{action}"
    assert requests.put(url, data=result).status_code == 200
    assert requests.get(url).status_code == 404  # its output is not in CAS: a miss, as over gRPC
    requests.put(f"{base}/team-a/cas/{sha(output)}", data=output).raise_for_status()
    got = requests.get(url)
    assert got.status_code == 200 and got.content == result
    # The ActionCache entry is the one gRPC sees (keyed <hash>/0).
    served = re_grpc.ActionCacheStub(chan).GetActionResult(re_pb2.GetActionResultRequest(
        instance_name="team-a", action_digest=re_pb2.Digest(hash=action, size_bytes=0)))
    assert served.output_files[0].digest.hash == sha(output)


def test_ac_opaque_values_never_reach_the_action_cache(front, chan) -> None:
    base, _ = front
    key = sha(os.urandom(8))
    value = b"cCrS\x00\x01 a ccache result file " + os.urandom(100)
    assert requests.put(f"{base}/ac/{key}", data=value).status_code == 200
    assert requests.get(f"{base}/ac/{key}").content == value
    with pytest.raises(grpc.RpcError) as exc:
        re_grpc.ActionCacheStub(chan).GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=re_pb2.Digest(hash=key, size_bytes=0)))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    big = os.urandom(5 * MiB)  # larger than any ActionResult: streamed to the opaque store
    assert requests.put(f"{base}/ac/{key}", data=big).status_code == 200
    assert requests.get(f"{base}/ac/{key}").content == big


def test_opaque_layouts_and_webdav(front) -> None:
    base, _ = front
    flat, subdirs = f"{base}/ccache/{uuid.uuid4().hex}", f"{base}/team-a/ab/{uuid.uuid4().hex}"
    for url in (flat, subdirs):
        assert requests.get(url).status_code == 404
        assert requests.put(url, data=b"value of " + url.encode()).status_code == 201
        assert requests.get(url).content == b"value of " + url.encode()
    # The instance prefix separates namespaces: team-a's key is not the default instance's.
    assert requests.get(subdirs.replace("/team-a/", "/")).status_code == 404
    # sccache: check file, MKCOL of each level, PUT, GET, PROPFIND.
    assert requests.put(f"{base}/.sccache_check", data=b"Hello, World!").status_code == 201
    for level in ("/a/", "/a/b/", "/a/b/c/"):
        assert requests.request("MKCOL", f"{base}{level}").status_code == 201
    assert requests.put(f"{base}/a/b/c/abc123", data=b"entry").status_code == 201
    found = requests.request("PROPFIND", f"{base}/a/b/c/abc123", headers={"Depth": "0"})
    assert found.status_code == 207 and b"<D:getcontentlength>5<" in found.content
    collection = requests.request("PROPFIND", f"{base}/a/b/", headers={"Depth": "0"})
    assert collection.status_code == 207 and b"<D:collection/>" in collection.content
    assert requests.request("PROPFIND", f"{base}/a/b/c/nothing").status_code == 404
    assert requests.delete(f"{base}/a/b/c/abc123").status_code == 204
    assert requests.get(f"{base}/a/b/c/abc123").status_code == 404
    assert requests.get(f"{base}/a//etc").status_code == 400
    assert requests.get(f"{base}/a/%2e%2e/etc").status_code == 400
    assert requests.request("PATCH", f"{base}/cas/{sha(b'')}").status_code == 405


# -- access control ---------------------------------------------------------------------------------------

WRITE_A = "writer-for-team-a-0123456789"
READ_ALL = "reader-everywhere-9876543210"


@pytest.fixture(scope="module")
def guarded(module_server_factory, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("auth")
    tokens = directory / "tokens"
    tokens.write_text(f"sha256:{sha(WRITE_A.encode())} write team-a\nsha256:{sha(READ_ALL.encode())} read\n")
    port = free_port()
    config = directory / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "auth": {"tokens": str(tokens)}, "http-listen": f"127.0.0.1:{port}",
        "instances": {"": {}, "team-a": {}, "public": {"anonymous": "read-only"}},
    }))
    module_server_factory(["--config", str(config)])
    return f"http://127.0.0.1:{port}"


def _auth(token: str | None, basic: bool) -> dict[str, str] | tuple[str, str] | None:
    if token is None:
        return None
    return ("anyone", token) if basic else {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("basic", [False, True], ids=["bearer", "basic"])
@pytest.mark.parametrize("instance", ["", "team-a", "public"])
@pytest.mark.parametrize("token", [None, READ_ALL, WRITE_A, "bogus-token-000"], ids=["anon", "read", "write-a",
                                                                                      "bogus"])
def test_access_table(guarded: str, token: str | None, instance: str, basic: bool) -> None:
    """What each caller may do on each instance, the same rules as gRPC."""
    prefix = f"/{instance}" if instance else ""
    data = os.urandom(100)
    creds = _auth(token, basic)
    kwargs = {"auth": creds} if basic and creds else {"headers": creds} if creds else {}
    urls = {"cas": f"{guarded}{prefix}/cas/{sha(data)}", "opaque": f"{guarded}{prefix}/k/{uuid.uuid4().hex}"}
    may_read = (token in (READ_ALL, WRITE_A) and (token == READ_ALL or instance == "team-a")) or (
        token is None and instance == "public")
    may_write = token == WRITE_A and instance == "team-a"
    for route, url in urls.items():
        put = requests.put(url, data=data, **kwargs)
        get = requests.get(url, **kwargs)
        if may_write:
            assert put.status_code in (200, 201), (route, put.text)
        if may_read:
            assert get.status_code == (200 if may_write else 404), (route, get.text)
        for response, allowed in ((put, may_write), (get, may_read)):
            if allowed:
                continue
            authenticated = token in (READ_ALL, WRITE_A)
            assert response.status_code == (403 if authenticated else 401), (route, response.text)
            if response.status_code == 401:
                assert "Bearer" in response.headers["WWW-Authenticate"]
        if not may_write and may_read:
            assert get.status_code == 404  # nothing was stored by the refused PUT


def test_jwt_and_authenticated_action_cache_writers(module_server_factory, tmp_path_factory) -> None:
    """JWTs work over HTTP as over gRPC, and `action-cache-writers: authenticated` keeps anonymous
    writers (allowed to write CAS here) out of `/ac/` and the opaque namespace."""
    import jwt

    secret = "http-front-test-secret-0123456789abcdef"
    port = free_port()
    config = tmp_path_factory.mktemp("jwt") / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "http-listen": f"127.0.0.1:{port}",
        "auth": {"jwt": {"secret": secret}, "anonymous": "read-write", "action-cache-writers": "authenticated"},
    }))
    module_server_factory(["--config", str(config)])
    base = f"http://127.0.0.1:{port}"
    token = jwt.encode({"sub": "ci", "scope": "casbah:write", "exp": int(time.time()) + 600}, secret,
                       algorithm="HS256")
    data = os.urandom(100)
    assert requests.put(f"{base}/cas/{sha(data)}", data=data).status_code == 200  # anonymous CAS write
    for url in (f"{base}/ac/{sha(data)}", f"{base}/ccache/{sha(data)}"):
        assert requests.put(url, data=b"value").status_code == 403, url
        assert requests.put(url, data=b"value", headers={"Authorization": f"Bearer {token}"}).status_code in (
            200, 201), url
        assert requests.get(url).content == b"value"
    expired = jwt.encode({"sub": "ci", "scope": "write", "exp": int(time.time()) - 10}, secret, algorithm="HS256")
    refused = requests.put(f"{base}/k/x", data=b"v", headers={"Authorization": f"Bearer {expired}"})
    assert refused.status_code == 401 and "expired" in refused.text.lower()


# -- memory ---------------------------------------------------------------------------------------------


def test_large_put_and_get_stream_with_bounded_memory(front) -> None:
    """300 MiB generated on the fly in and out: the server's RSS grows by far less."""
    base, server = front
    size, block = 300 * MiB, os.urandom(MiB)

    def generated() -> Iterator[bytes]:
        for index in range(size // MiB):
            yield index.to_bytes(8, "little") + block[8:]

    hasher = hashlib.sha256()
    for chunk in generated():
        hasher.update(chunk)
    url = f"{base}/cas/{hasher.hexdigest()}"
    process = psutil.Process(server.pid)
    before = process.memory_info().rss
    peak = before

    class Sampled:
        """The body, sampling the server's RSS as it goes; its length makes requests send
        Content-Length (Bazel's way) instead of chunks."""

        def __len__(self) -> int:
            return size

        def __iter__(self) -> Iterator[bytes]:
            nonlocal peak
            for number, chunk in enumerate(generated()):
                if number % 16 == 0:
                    peak = max(peak, process.memory_info().rss)
                yield chunk

    response = requests.put(url, data=Sampled())
    assert response.status_code == 200, response.text
    received = hashlib.sha256()
    with requests.get(url, stream=True) as got:
        for number, chunk in enumerate(got.iter_content(MiB)):
            received.update(chunk)
            if number % 16 == 0:
                peak = max(peak, process.memory_info().rss)
    assert received.hexdigest() == hasher.hexdigest()
    print(f"300 MiB PUT + GET: server RSS grew by {(peak - before) / MiB:.1f} MiB")
    assert peak - before < 100 * MiB, f"server RSS grew by {(peak - before) / MiB:.0f} MiB"


def test_metrics_count_http_requests(module_server_factory) -> None:
    http, metrics = free_port(), free_port()
    module_server_factory(["--http-listen", f"127.0.0.1:{http}", "--metrics-listen", f"127.0.0.1:{metrics}"])
    requests.get(f"http://127.0.0.1:{http}/cas/{sha(b'missing')}")
    text = requests.get(f"http://127.0.0.1:{metrics}/metrics").text
    assert 'casbah_http_requests_total{code="404",method="GET",route="cas"} 1.0' in text


def test_http_listen_in_config_and_bad_address(tmp_path: Path, start_server) -> None:
    with pytest.raises(RuntimeError, match="http-listen"):
        start_server(["--http-listen", "nonsense"])


def test_a_body_cut_short_stores_nothing(front) -> None:
    """A client that goes away before its Content-Length is sent leaves no entry, and no error in the log."""
    base, server = front
    port = int(base.rsplit(":", 1)[1])
    paths = [f"/ac/{sha(os.urandom(4))}", f"/cas/{sha(os.urandom(4))}", f"/k/{uuid.uuid4().hex}"]
    for path in paths:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\npartial".encode())
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1000)
    for path in paths:
        assert requests.get(base + path).status_code == 404, path
    assert " ERROR " not in server.log_path.read_text(), server.log()


def test_workers_share_the_front(module_server_factory) -> None:
    """`--workers 2`: a blob PUT through one worker is readable at once through either (fresh
    connections land on either process; the disk store finds a sibling's file by hash)."""
    port = free_port()
    module_server_factory(["--workers", "2", "--http-listen", f"127.0.0.1:{port}"])
    for _ in range(20):
        data = os.urandom(200)
        url = f"http://127.0.0.1:{port}/cas/{sha(data)}"
        assert requests.put(url, data=data).status_code == 200
        got = requests.get(url)
        assert got.status_code == 200 and got.content == data
        key = f"http://127.0.0.1:{port}/k/{sha(data)}"
        assert requests.put(key, data=data).status_code == 201
        assert requests.get(key).content == data


def test_an_exposed_http_front_without_auth_is_warned_about(start_server) -> None:
    port = free_port()
    server = start_server(["--http-listen", f"0.0.0.0:{port}"])
    text = server.log_path.read_text()
    assert f"0.0.0.0:{port} is reachable from other machines and anonymous callers may WRITE" in text, text
