"""Fuzzing, continued (see test_fuzz.py): ByteStream reads of real blobs at hostile offsets,
limits and compressions (a success must be exactly the requested bytes), hostile Remote
Asset and ReferenceStorage requests through a default client (a status message that
echoes too much would surface as the client's own RESOURCE_EXHAUSTED), and the two files
an operator writes: the YAML config and the tokens file.  A bad file is a precise error
(a `CasbahError`, printed as one message), never a traceback.  About 30 s in all.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from security_helpers import OPTIONS, Casbah, cli, free_port, token_hash

from casbah import compression
from casbah.config import load_config
from casbah.errors import CasbahError
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.server.app import StartupError, build_instances
from casbah.server.auth import load_tokens

SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
BLOBS = [os.urandom(100), os.urandom(3 << 20), b"\0" * (2 << 20) + os.urandom(10)]


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Casbah]:
    root = tmp_path_factory.mktemp("fuzz-inputs")
    casbah = Casbah(["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(root / "data")],
                    root / "server.log").start()
    with grpc.insecure_channel(casbah.address, options=OPTIONS) as channel:
        for blob in BLOBS:
            name = f"uploads/{uuid.uuid4()}/blobs/{_digest(blob).hash}/{len(blob)}"
            pieces = [blob[i:i + (1 << 20)] for i in range(0, len(blob), 1 << 20)]
            bs_grpc.ByteStreamStub(channel).Write(iter(
                bs_pb2.WriteRequest(resource_name=name if i == 0 else "", write_offset=i << 20, data=p,
                                    finish_write=i == len(pieces) - 1) for i, p in enumerate(pieces)), timeout=30)
    yield casbah
    assert casbah.alive()
    assert "Traceback" not in casbah.log()
    casbah.stop()


@pytest.fixture(scope="module")
def channel(server: Casbah) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:  # default client limits, deliberately
        yield ch


OFFSETS = st.one_of(st.integers(-3, 200), st.integers(0, 4 << 20), st.integers(-(1 << 63), (1 << 63) - 1))


@settings(max_examples=150, **SETTINGS)
@given(blob=st.sampled_from(range(len(BLOBS))), offset=OFFSETS, limit=OFFSETS,
       compressed=st.booleans(), instance=st.sampled_from(["", "x", "a" * 5000, "blobs", "../.."]))
def test_bytestream_reads(channel: grpc.Channel, blob: int, offset: int, limit: int, compressed: bool,
                          instance: str) -> None:
    data = BLOBS[blob]
    d = _digest(data)
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    name = f"{instance + '/' if instance else ''}{kind}/{d.hash}/{d.size_bytes}"
    try:
        got = b"".join(m.data for m in bs_grpc.ByteStreamStub(channel).Read(
            bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit), timeout=30))
    except grpc.RpcError as exc:
        assert exc.code() not in FORBIDDEN, (exc.code(), (exc.details() or "")[:300])
        assert len(exc.details() or "") < 2100
        return
    assert instance == ""
    if compressed:
        got = compression.decompress(got, len(data) - offset)
    end = len(data) if limit == 0 else offset + limit
    assert got == data[offset:end]


TEXT = st.one_of(st.text(max_size=40), st.text(min_size=3000, max_size=20_000), st.just("\0\n\r"))


@settings(max_examples=150, **SETTINGS)
@given(rpc=st.sampled_from(["fetch", "push", "getref", "updref"]), instance=st.one_of(TEXT, st.just("")),
       uris=st.lists(TEXT, max_size=3), names=st.lists(TEXT, max_size=3), values=st.lists(TEXT, max_size=3),
       blob=st.sampled_from(range(len(BLOBS))))
def test_asset_and_reference_requests(channel: grpc.Channel, rpc: str, instance: str, uris: list[str],
                                      names: list[str], values: list[str], blob: int) -> None:
    qualifiers = [ra_pb2.Qualifier(name=n, value=v) for n, v in zip(names, values, strict=False)]
    digest = _digest(BLOBS[blob])
    try:
        if rpc == "fetch":
            ra_grpc.FetchStub(channel).FetchBlob(ra_pb2.FetchBlobRequest(
                instance_name=instance, uris=uris, qualifiers=qualifiers), timeout=30)
        elif rpc == "push":
            ra_grpc.PushStub(channel).PushBlob(ra_pb2.PushBlobRequest(
                instance_name=instance, uris=uris, qualifiers=qualifiers, blob_digest=digest), timeout=30)
        elif rpc == "getref":
            bst_grpc.ReferenceStorageStub(channel).GetReference(bst_pb2.GetReferenceRequest(
                instance_name=instance, key=(uris or [""])[0]), timeout=30)
        else:
            bst_grpc.ReferenceStorageStub(channel).UpdateReference(bst_pb2.UpdateReferenceRequest(
                instance_name=instance, keys=uris, digest=digest), timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() not in FORBIDDEN, (exc.code(), (exc.details() or "")[:300])
        assert len(exc.details() or "") < 2100


# --- the files an operator writes ----------------------------------------------------------------------------------

KEYS = ["listen", "data-dir", "quota", "limits", "auth", "instances", "storages", "metrics-listen", "tls-cert",
        "max-message-size", "max-batch-size", "log-format", "reload-interval", "asset-purge-interval", "bogus"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 1 << 40), st.floats(allow_nan=True),
                    st.sampled_from(["", "1G", "-1M", "memory", "disk", "sqlite", "read-only", "none", "${NOPE}",
                                     "127.0.0.1:0", "unix:/nonexistent/x.sock", "zstd", "default", "x" * 300]),
                    st.text(max_size=10))
VALUES = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(["kind", "max-size", "storage", "path", "tokens", "anonymous",
                                               "jwt", "secret-file", "jwks", "services", "asset-index",
                                               "action-cache", "fast", "slow", "", "idle-timeout"]),
                              st.text(max_size=6)), children, max_size=4)), max_leaves=12)


async def _build_and_close(config) -> None:
    instances, loader = build_instances(config)
    for storage in loader.all():
        await storage.close()
    for instance in instances:
        await instance.extras["asset"].index.close()


@settings(max_examples=200, **SETTINGS)
@given(document=st.one_of(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5),
                          st.binary(max_size=200), st.text(max_size=200)))
def test_config_loader(tmp_path_factory: pytest.TempPathFactory, document) -> None:
    """Any config file: loaded and built, or one `CasbahError` (ConfigError) naming what is wrong."""
    root = tmp_path_factory.mktemp("config")
    path = root / "casbah.yaml"
    if isinstance(document, dict):
        document.setdefault("data-dir", str(root / "data"))
        path.write_text(yaml.safe_dump(document))
    elif isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(document)
    try:
        config = load_config(path)
        if not str(config.data_dir).startswith(str(root)):
            return  # a fuzzed data-dir could be anywhere: do not create it
        asyncio.run(_build_and_close(config))
    except (CasbahError, StartupError) as exc:
        assert str(exc).strip()


@settings(max_examples=300, **SETTINGS)
@given(lines=st.lists(st.one_of(
    st.builds(lambda h, rest: f"sha256:{h} {rest}", st.text("0123456789abcdefABCDEF", min_size=60, max_size=66),
              st.sampled_from(["read", "write", "write A B", "admin", "", "read \"\"", "read #x"])),
    st.text(max_size=80)), max_size=6), binary=st.one_of(st.none(), st.binary(min_size=1, max_size=40)))
def test_tokens_file_loader(tmp_path_factory: pytest.TempPathFactory, lines: list[str], binary: bytes | None) -> None:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    if binary is not None:
        path.write_bytes(binary)
    else:
        path.write_text("\n".join(lines))
    try:
        tokens = load_tokens(str(path))
    except CasbahError as exc:
        assert str(exc).startswith(str(path)) or "cannot read" in str(exc)
        return
    assert all(len(h) == 64 for h in tokens)


def test_bad_tokens_file_is_one_error_line_at_startup(tmp_path: Path) -> None:
    """`casbah serve` with a tokens file that does not load exits 1 with the reason, no traceback."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token_hash('x')} write\nsha256:nothex admin\n")
    result = cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"),
                 "--tokens", str(tokens), timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{tokens}:2: a token is written 'sha256:<64 hex>'" in result.stderr
