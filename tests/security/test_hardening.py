"""Nothing before authentication, bounded echoes of client input, the status page under
the gRPC side's access control, and operations without restarts (SIGHUP and file-watch
reloads of tokens and TLS certificates, background purge of expired assets)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import timestamp_pb2
from security_helpers import OPTIONS, Casbah, Pki, bearer, free_port, make_pki, token_hash

from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

WRITE_A = "writer-of-instance-A-0123456789"
READ_ALL = "reader-of-everything-0123456789"
LATER = "a-token-added-while-serving-0123"
BOGUS = "a-token-nobody-issued-0123456789"


def tokens_file(path: Path, *extra: str) -> Path:
    path.write_text(f"{token_hash(WRITE_A)} write A\n{token_hash(READ_ALL)} read\n" + "".join(extra))
    return path


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[tuple[Casbah, int, Path]]:
    """Instances A, B and secret-C behind tokens, a status page, fast reload and purge."""
    tokens = tokens_file(tmp_path / "tokens")
    http_port = free_port()
    config = tmp_path / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "listen": [f"127.0.0.1:{free_port()}"], "data-dir": str(tmp_path / "data"),
        "metrics-listen": f"127.0.0.1:{http_port}", "auth": {"tokens": str(tokens)},
        "instances": {"A": {}, "B": {}, "secret-C": {}},
        "reload-interval": 0.3, "asset-purge-interval": 0.5,
    }))
    server = Casbah(["--config", str(config)], tmp_path / "server.log").start()
    yield server, http_port, tokens
    server.stop()


def capabilities(channel: grpc.Channel, instance: str, token: str | None) -> grpc.RpcError | None:
    try:
        re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=instance),
                                                          metadata=bearer(token), timeout=10)
    except grpc.RpcError as exc:
        return exc
    return None


def test_unknown_instance_reveals_nothing_before_authentication(auth_server) -> None:
    server, _, _ = auth_server
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        for token in (None, BOGUS):
            err = capabilities(channel, "no-such-instance", token)
            assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert "secret-C" not in (err.details() or "") and "'A'" not in (err.details() or "")
        # An authenticated caller learns only the names it may use.
        err = capabilities(channel, "no-such-instance", WRITE_A)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "this server serves 'A'" in err.details() and "secret-C" not in err.details(), err.details()
        err = capabilities(channel, "no-such-instance", READ_ALL)
        assert err is not None and "'A', 'B', 'secret-C'" in err.details()


def test_a_huge_instance_name_gets_a_short_invalid_argument(auth_server, start_server) -> None:
    """A 100 KB name is echoed cut short: the default client (16 KiB metadata limit) sees the
    server's INVALID_ARGUMENT, not its own RESOURCE_EXHAUSTED."""
    huge = "x" * 100_000
    open_server = start_server()
    for address, token in ((auth_server[0].address, READ_ALL), (open_server.address, None)):
        with grpc.insecure_channel(address) as channel:  # default client options
            err = capabilities(channel, huge, token)
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert len(err.details()) < 1000 and "(100002 characters)" in err.details()
            with pytest.raises(grpc.RpcError) as read_err:
                name = f"{huge}/blobs/{'0' * 64}/1"
                list(bs_grpc.ByteStreamStub(channel).Read(bs_pb2.ReadRequest(resource_name=name),
                                                          metadata=bearer(token), timeout=10))
            assert read_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(read_err.value.details()) < 1000


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def test_status_page_and_metrics_need_the_grpc_credentials(auth_server) -> None:
    _, port, _ = auth_server
    assert get(port, "/healthz")[0] == 200
    for path in ("/api/status", "/metrics", "/api/requests", "/api/lookup?instance=A&digest=" + "0" * 64 + "/1",
                 "/api/asset?instance=A&uri=https://example.com/x"):
        status, _, body = get(port, path)
        assert status == 401 and "error" in json.loads(body), path
        assert get(port, path, {"Authorization": f"Bearer {BOGUS}"})[0] == 401, path
        assert get(port, path, {"Authorization": f"Bearer {READ_ALL}"})[0] in (200, 404), path
    status, headers, _ = get(port, "/")
    assert status == 302 and headers["Location"] == "/login"
    # Lookups need the read scope on the instance they look into.
    lookup_b = "/api/lookup?instance=B&digest=" + "0" * 64 + "/1"
    assert get(port, lookup_b, {"Authorization": f"Bearer {WRITE_A}"})[0] == 403
    assert get(port, "/api/lookup?instance=A&digest=" + "0" * 64 + "/1",
               {"Authorization": f"Bearer {WRITE_A}"})[0] == 200

    # The login form: a wrong token gets the form again, a right one a cookie that opens the page.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    conn.request("POST", "/login", body=urllib.parse.urlencode({"token": BOGUS}), headers=form)
    assert conn.getresponse().status == 401
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/login", body=urllib.parse.urlencode({"token": READ_ALL}), headers=form)
    response = conn.getresponse()
    cookie = response.getheader("Set-Cookie") or ""
    conn.close()
    assert response.status == 302 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    jar = {"Cookie": cookie.split(";", 1)[0]}
    assert get(port, "/api/asset?instance=B&uri=https://example.com/x", jar)[0] == 200
    assert get(port, "/", jar)[0] == 200


def test_tokens_file_reloads_on_change_and_on_sighup(auth_server) -> None:
    server, _, tokens = auth_server
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        assert capabilities(channel, "A", LATER).code() == grpc.StatusCode.UNAUTHENTICATED
        tokens_file(tokens, f"{token_hash(LATER)} read A\n")  # the watch picks it up
        deadline = time.monotonic() + 10
        while capabilities(channel, "A", LATER) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert capabilities(channel, "A", LATER) is None
        # A broken file keeps the tokens in force and says why.
        tokens.write_text("this is not a tokens file\n")
        time.sleep(1.0)
        assert capabilities(channel, "A", LATER) is None
        assert re.search(r"cannot reload the tokens file .*keeping the current tokens", server.log())
        # SIGHUP reloads at once (no waiting for the watch): LATER is gone again.
        tokens_file(tokens)
        os.utime(tokens, (1, 1))  # a modification time the watch already knows would not trigger it
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while capabilities(channel, "A", LATER) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert capabilities(channel, "A", LATER).code() == grpc.StatusCode.UNAUTHENTICATED
        assert "SIGHUP: reloaded the tokens file" in server.log()


def test_expired_assets_are_purged_in_the_background(auth_server, tmp_path: Path) -> None:
    server, _, _ = auth_server
    data = b"content named by an expiring asset"
    digest = re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            instance_name="A", requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]),
            metadata=bearer(WRITE_A), timeout=10)
        soon = timestamp_pb2.Timestamp()
        soon.FromNanoseconds(int((time.time() + 1.0) * 1e9))
        ra_grpc.PushStub(channel).PushBlob(ra_pb2.PushBlobRequest(
            instance_name="A", uris=["https://example.com/expiring"], blob_digest=digest, expire_at=soon),
            metadata=bearer(WRITE_A), timeout=10)
    index = tmp_path / "data" / "assets" / "i_A.sqlite"

    def rows() -> int:
        with sqlite3.connect(index) as db:
            return db.execute("SELECT count(*) FROM assets").fetchone()[0]

    assert rows() == 1
    deadline = time.monotonic() + 10
    while rows() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rows() == 0
    assert "instance 'A': purged 1 expired asset(s)" in server.log()


def test_tls_certificate_reloads_on_sighup(pki: Pki, tmp_path: Path) -> None:
    """A new certificate (from another CA) is served to new connections after SIGHUP,
    without a restart; a client trusting only the new CA fails before and succeeds after."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    server = Casbah(["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"),
                     "--tls-cert", str(cert), "--tls-key", str(key)], tmp_path / "server.log").start()
    try:
        new = make_pki(tmp_path / "new-pki")

        def works(ca: Path) -> bool:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
            with grpc.secure_channel(server.address, credentials,
                                     options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                return capabilities(channel, "", None) is None

        assert works(pki.ca) and not works(new.ca)
        key.write_bytes(new.server.key.read_bytes())  # key first: a half-rotated pair is refused
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert works(pki.ca)
        assert "certificate does not match the key" in server.log()
        cert.write_bytes(new.server.cert.read_bytes())
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not works(new.ca) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert works(new.ca) and not works(pki.ca)
    finally:
        server.stop()
