"""`examples/production.yaml`, the configuration docs/security.md recommends, loads through
the real config loader and serves as documented: TLS everywhere, tokens on one port,
client certificates on the other, nothing for anonymous callers, status page on loopback."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import grpc
import pytest
from security_helpers import OPTIONS, ROOT, Pki, bearer, free_port, token_hash

from casbah.config import load_config
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

EXAMPLE = ROOT / "examples" / "production.yaml"
WRITER_TOKEN = "production-example-writer-0123456789"
BLOB = b"stored through the production example\n"
DIGEST = re_pb2.Digest(hash=hashlib.sha256(BLOB).hexdigest(), size_bytes=len(BLOB))


def test_the_documented_example_is_the_file() -> None:
    """docs/security.md shows examples/production.yaml verbatim, so the tested file is the documented one."""
    assert EXAMPLE.read_text() in (ROOT / "docs" / "security.md").read_text()


def test_loads_with_its_defaults() -> None:
    """Without any environment variable the example is a valid config with the documented settings."""
    config = load_config(EXAMPLE)
    assert config.auth.anonymous == "none"
    assert config.auth.action_cache_writers == "authenticated"
    assert config.metrics_listen == "127.0.0.1:9090"
    listeners = config.listeners()
    assert [item.address for item in listeners] == ["0.0.0.0:50051", "0.0.0.0:50052"]
    assert all(item.tls_cert and item.tls_key for item in listeners)
    assert listeners[1].tls_client_ca == "/etc/casbah/clients-ca.pem"
    assert config.instances[""].origin_fetch is not None


def call(channel: grpc.Channel, metadata: tuple = ()) -> grpc.StatusCode:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    try:
        cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=DIGEST, data=BLOB)]), metadata=metadata,
            timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_serves_as_documented(launch, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token_hash(WRITER_TOKEN)} write\n")
    metrics = f"127.0.0.1:{free_port()}"
    for name, value in {"CASBAH_LISTEN": f"127.0.0.1:{free_port()}", "CASBAH_MTLS_LISTEN": f"127.0.0.1:{free_port()}",
                        "CASBAH_TLS_CERT": str(pki.server.cert), "CASBAH_TLS_KEY": str(pki.server.key),
                        "CASBAH_CLIENT_CA": str(pki.ca), "CASBAH_TOKENS": str(tokens),
                        "CASBAH_METRICS_LISTEN": metrics, "CASBAH_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)  # the server process inherits them
    server = launch(["--config", str(EXAMPLE)], listeners=2)
    token_url, mtls_url = server.urls
    assert token_url.startswith("grpcs://") and mtls_url.startswith("grpcs://")

    server_only = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with grpc.secure_channel(token_url.removeprefix("grpcs://"), server_only, options=OPTIONS) as channel:
        assert call(channel) == grpc.StatusCode.UNAUTHENTICATED  # anonymous: nothing
        assert call(channel, bearer("a-token-nobody-issued")) == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, bearer(WRITER_TOKEN)) == grpc.StatusCode.OK
    with_cert = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.writer.key.read_bytes(),
                                             pki.writer.cert.read_bytes())
    with grpc.secure_channel(mtls_url.removeprefix("grpcs://"), with_cert, options=OPTIONS) as channel:
        assert call(channel) == grpc.StatusCode.OK  # CN=ci-writer
    with urllib.request.urlopen(f"http://{metrics}/healthz", timeout=10) as response:
        assert response.status == 200
    assert "reachable from other machines" not in server.log()
