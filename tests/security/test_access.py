"""Access control: scopes from static tokens, JWTs and mTLS subjects, enforced on every RPC
of every service, and the audit log of denied calls and writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from security_helpers import OPTIONS, Casbah, Pki, bearer, free_port, token_hash

from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.protos.casbah.admin.v1 import admin_pb2
from casbah.protos.casbah.admin.v1 import admin_pb2_grpc as admin_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.server.auth import parse_subject

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
EMPTY = re_pb2.Digest(hash=hashlib.sha256(b"").hexdigest(), size_bytes=0)  # also the empty Directory

WRITE_TOKEN = "ci-writer-token-for-A-0123456789"
READ_TOKEN = "everyone-may-read-9876543210"
BOGUS_TOKEN = "not-a-token-the-server-knows"


def digest_of(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def fresh() -> tuple[bytes, re_pb2.Digest]:
    data = os.urandom(64)
    return data, digest_of(data)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):  # a server stream: errors come while reading it
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return OK


# --- one invocation of every RPC ------------------------------------------------------------------------------


def _capabilities(ch, inst, md):
    return re_grpc.CapabilitiesStub(ch).GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=inst),
                                                        metadata=md, timeout=10)


def _find_missing(ch, inst, md):
    return re_grpc.ContentAddressableStorageStub(ch).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(instance_name=inst, blob_digests=[fresh()[1]]), metadata=md, timeout=10)


def _batch_update(ch, inst, md):
    data, digest = fresh()
    response = re_grpc.ContentAddressableStorageStub(ch).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name=inst, requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]),
        metadata=md, timeout=10)
    assert response.responses[0].status.code == 0, response
    return response


def _batch_read(ch, inst, md):
    return re_grpc.ContentAddressableStorageStub(ch).BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(instance_name=inst, digests=[EMPTY]), metadata=md, timeout=10)


def _get_tree(ch, inst, md):
    return re_grpc.ContentAddressableStorageStub(ch).GetTree(
        re_pb2.GetTreeRequest(instance_name=inst, root_digest=EMPTY), metadata=md, timeout=10)


def _bytestream_read(ch, inst, md):
    prefix = f"{inst}/" if inst else ""
    return bs_grpc.ByteStreamStub(ch).Read(
        bs_pb2.ReadRequest(resource_name=f"{prefix}blobs/{EMPTY.hash}/0"), metadata=md, timeout=10)


def _bytestream_write(ch, inst, md):
    data, digest = fresh()
    prefix = f"{inst}/" if inst else ""
    name = f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
    return bs_grpc.ByteStreamStub(ch).Write(
        iter([bs_pb2.WriteRequest(resource_name=name, data=data, finish_write=True)]), metadata=md, timeout=10)


def _query_write_status(ch, inst, md):
    digest = fresh()[1]
    prefix = f"{inst}/" if inst else ""
    return bs_grpc.ByteStreamStub(ch).QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(
        resource_name=f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"),
        metadata=md, timeout=10)


def _get_action_result(ch, inst, md):
    return re_grpc.ActionCacheStub(ch).GetActionResult(
        re_pb2.GetActionResultRequest(instance_name=inst, action_digest=fresh()[1]), metadata=md, timeout=10)


def _update_action_result(ch, inst, md):
    return re_grpc.ActionCacheStub(ch).UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name=inst, action_digest=fresh()[1], action_result=re_pb2.ActionResult(exit_code=0)),
        metadata=md, timeout=10)


def _fetch_blob(ch, inst, md):
    response = ra_grpc.FetchStub(ch).FetchBlob(
        ra_pb2.FetchBlobRequest(instance_name=inst, uris=[f"https://example.com/{uuid.uuid4()}"]),
        metadata=md, timeout=10)
    assert response.status.code == NOT_FOUND.value[0], response  # a miss, in the response (not Bazel)
    return response


def _fetch_directory(ch, inst, md):
    return ra_grpc.FetchStub(ch).FetchDirectory(
        ra_pb2.FetchDirectoryRequest(instance_name=inst, uris=[f"https://example.com/{uuid.uuid4()}"]),
        metadata=md, timeout=10)


def _push_blob(ch, inst, md):
    return ra_grpc.PushStub(ch).PushBlob(ra_pb2.PushBlobRequest(
        instance_name=inst, uris=[f"https://example.com/{uuid.uuid4()}"], blob_digest=EMPTY), metadata=md,
        timeout=10)


def _push_directory(ch, inst, md):
    return ra_grpc.PushStub(ch).PushDirectory(ra_pb2.PushDirectoryRequest(
        instance_name=inst, uris=[f"https://example.com/{uuid.uuid4()}"], root_directory_digest=EMPTY),
        metadata=md, timeout=10)


def _split_blob(ch, inst, md):
    return re_grpc.ContentAddressableStorageStub(ch).SplitBlob(
        re_pb2.SplitBlobRequest(instance_name=inst, blob_digest=EMPTY), metadata=md, timeout=10)


def _splice_blob(ch, inst, md):
    return re_grpc.ContentAddressableStorageStub(ch).SpliceBlob(
        re_pb2.SpliceBlobRequest(instance_name=inst, blob_digest=EMPTY), metadata=md, timeout=10)


def _get_reference(ch, inst, md):
    return bst_grpc.ReferenceStorageStub(ch).GetReference(
        bst_pb2.GetReferenceRequest(instance_name=inst, key=str(uuid.uuid4())), metadata=md, timeout=10)


def _update_reference(ch, inst, md):
    return bst_grpc.ReferenceStorageStub(ch).UpdateReference(
        bst_pb2.UpdateReferenceRequest(instance_name=inst, keys=[str(uuid.uuid4())], digest=EMPTY),
        metadata=md, timeout=10)


def _reference_status(ch, inst, md):
    return bst_grpc.ReferenceStorageStub(ch).Status(bst_pb2.StatusRequest(instance_name=inst), metadata=md,
                                                   timeout=10)


def _admin_scrub(ch, inst, md):
    return admin_grpc.AdminStub(ch).Scrub(admin_pb2.ScrubRequest(instance_name=inst, dry_run=True), metadata=md,
                                          timeout=30)


def _admin_stats(ch, inst, md):
    return admin_grpc.AdminStub(ch).Stats(admin_pb2.StatsRequest(instance_name=inst), metadata=md, timeout=10)


def _admin_gc(ch, inst, md):
    return admin_grpc.AdminStub(ch).Gc(admin_pb2.GcRequest(instance_name=inst), metadata=md, timeout=30)


@dataclass(frozen=True)
class Rpc:
    name: str
    call: Callable
    write: bool
    #: The status an authorized caller gets (these requests name absent content where that is natural).
    allowed: grpc.StatusCode = OK


RPCS = [
    Rpc("Capabilities.GetCapabilities", _capabilities, False),
    Rpc("CAS.FindMissingBlobs", _find_missing, False),
    Rpc("CAS.BatchUpdateBlobs", _batch_update, True),
    Rpc("CAS.BatchReadBlobs", _batch_read, False),
    Rpc("CAS.GetTree", _get_tree, False),
    # Not implemented yet: an authorized caller gets UNIMPLEMENTED, anyone else the access status.
    Rpc("CAS.SplitBlob", _split_blob, False),  # the empty blob: no chunks
    Rpc("CAS.SpliceBlob", _splice_blob, True),  # the empty blob from no chunks
    Rpc("ByteStream.Read", _bytestream_read, False),
    Rpc("ByteStream.Write", _bytestream_write, True),
    Rpc("ByteStream.QueryWriteStatus", _query_write_status, False, NOT_FOUND),
    Rpc("ActionCache.GetActionResult", _get_action_result, False, NOT_FOUND),
    Rpc("ActionCache.UpdateActionResult", _update_action_result, True),
    Rpc("Fetch.FetchBlob", _fetch_blob, False),
    Rpc("Fetch.FetchDirectory", _fetch_directory, False),
    Rpc("Push.PushBlob", _push_blob, True),
    Rpc("Push.PushDirectory", _push_directory, True),
    Rpc("ReferenceStorage.GetReference", _get_reference, False, NOT_FOUND),
    Rpc("ReferenceStorage.UpdateReference", _update_reference, True),
    Rpc("ReferenceStorage.Status", _reference_status, False),
    # Maintenance: every call needs the write scope (stats too: they reveal what others stored).
    Rpc("Admin.Scrub", _admin_scrub, True),
    Rpc("Admin.Stats", _admin_stats, True),
    Rpc("Admin.Gc", _admin_gc, True),
]

#: identity -> (token, what it may do: {instance: "read" | "write"})
IDENTITIES: dict[str, tuple[str | None, dict[str, str]]] = {
    "anonymous": (None, {}),
    "read-token": (READ_TOKEN, {"A": "read", "B": "read"}),
    "write-token-A": (WRITE_TOKEN, {"A": "write"}),
    "bogus-token": (BOGUS_TOKEN, {}),
}


def expected(rpc: Rpc, identity: str, instance: str) -> grpc.StatusCode:
    token, grants = IDENTITIES[identity]
    grant = grants.get(instance)
    if grant == "write" or (grant == "read" and not rpc.write):
        return rpc.allowed
    if token is None or token == BOGUS_TOKEN:
        return UNAUTHENTICATED
    return DENIED


def write_tokens_file(path: Path) -> Path:
    path.write_text(
        "# casbah tokens: hashes only, so this file holds no secret\n"
        f"{token_hash(WRITE_TOKEN)} write A   # CI may write instance A only\n"
        "\n"
        f"{token_hash(READ_TOKEN)} read     # everyone may read every instance\n"
    )
    return path


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Casbah]:
    root = tmp_path_factory.mktemp("access")
    tokens = write_tokens_file(root / "tokens")
    server = Casbah(["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(root / "data"), "--tokens", str(tokens),
                     "--instance", "A", "--instance", "B"], root / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_channel(token_server: Casbah) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(token_server.address, options=OPTIONS) as channel:
        yield channel


@pytest.mark.parametrize("instance", ["A", "B"])
@pytest.mark.parametrize("identity", list(IDENTITIES))
@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
def test_scope_enforced_on_every_rpc(token_channel: grpc.Channel, rpc: Rpc, identity: str, instance: str) -> None:
    """Every RPC, identity and instance: the exact status, so a write RPC that forgot its
    write check (or a read RPC that forgot any check) fails here."""
    token = IDENTITIES[identity][0]
    assert code_of(lambda: rpc.call(token_channel, instance, bearer(token))) == expected(rpc, identity, instance)


def test_table_covers_every_rpc_of_every_service() -> None:
    """A new RPC added to a served service must be added to the table above."""
    services = {
        "Capabilities": re_pb2.DESCRIPTOR.services_by_name["Capabilities"],
        "CAS": re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"],
        "ActionCache": re_pb2.DESCRIPTOR.services_by_name["ActionCache"],
        "ByteStream": bs_pb2.DESCRIPTOR.services_by_name["ByteStream"],
        "Fetch": ra_pb2.DESCRIPTOR.services_by_name["Fetch"],
        "Push": ra_pb2.DESCRIPTOR.services_by_name["Push"],
        "ReferenceStorage": bst_pb2.DESCRIPTOR.services_by_name["ReferenceStorage"],
        "Admin": admin_pb2.DESCRIPTOR.services_by_name["Admin"],
    }
    served = {f"{short}.{m.name}" for short, service in services.items() for m in service.methods}
    assert served == {r.name for r in RPCS}


def wait_for_log(server: Casbah, pattern: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, server.log())
        if match:
            return match.group(0)
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}:\n{server.log()[-3000:]}")


def test_token_for_a_cannot_write_b_and_is_audited(token_server: Casbah, token_channel: grpc.Channel) -> None:
    """The A writer's upload to B is refused and nothing lands in B; the audit log names who
    (the token by its hash prefix), what, the instance and the digest, for the denial and the write."""
    data, digest = fresh()
    request = re_pb2.BatchUpdateBlobsRequest(
        instance_name="B", requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)])
    cas = re_grpc.ContentAddressableStorageStub(token_channel)
    with pytest.raises(grpc.RpcError) as err:
        cas.BatchUpdateBlobs(request, metadata=bearer(WRITE_TOKEN), timeout=10)
    assert err.value.code() == DENIED
    assert "no write scope on instance 'B'" in (err.value.details() or "")
    who = "token:" + token_hash(WRITE_TOKEN)[7:19]
    wait_for_log(token_server, rf"DENIED BatchUpdateBlobs on instance 'B' {digest.hash}/64 by {who} \(peer [^)]+\):"
                               r" no write scope")
    missing = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="B", blob_digests=[digest]),
                                   metadata=bearer(READ_TOKEN), timeout=10)
    assert list(missing.missing_blob_digests) == [digest]

    # The same bytes by ByteStream into A: allowed, and audited as a write.
    name = f"A/uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
    bs_grpc.ByteStreamStub(token_channel).Write(
        iter([bs_pb2.WriteRequest(resource_name=name, data=data, finish_write=True)]),
        metadata=bearer(WRITE_TOKEN), timeout=10)
    wait_for_log(token_server, rf"WRITE ByteStream.Write on instance 'A' {digest.hash}/64 by {who}")

    # Reads are not audited when allowed (they are most of the traffic), denied ones are.
    _, other = fresh()
    with pytest.raises(grpc.RpcError) as err:
        cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="A", blob_digests=[other]),
                             metadata=bearer(BOGUS_TOKEN), timeout=10)
    assert err.value.code() == UNAUTHENTICATED
    assert "unknown bearer token" in (err.value.details() or "")
    bogus = hashlib.sha256(BOGUS_TOKEN.encode()).hexdigest()[:12]
    wait_for_log(token_server, r"DENIED FindMissingBlobs on instance 'A' by unauthenticated caller \(peer [^)]+\): "
                               rf"unknown bearer token \(sha256:{bogus}")
    assert BOGUS_TOKEN not in token_server.log() and WRITE_TOKEN not in token_server.log()


def test_malformed_authorization_header_is_unauthenticated(token_channel: grpc.Channel) -> None:
    for value in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", READ_TOKEN):
        code = code_of(lambda v=value: _capabilities(token_channel, "A", (("authorization", v),)))
        assert code == UNAUTHENTICATED, value


# --- JWT ----------------------------------------------------------------------------------------------------------

HS_SECRET = "a-shared-secret-of-at-least-32-bytes!"


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    """(signing key, a key the server does not know, JWKS file with the first's public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="test-key", use="sig", alg="RS256")
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return key, stranger, path


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory: pytest.TempPathFactory, rsa_keys) -> Iterator[Casbah]:
    root = tmp_path_factory.mktemp("jwt")
    config = root / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "auth": {"jwt": {"secret": HS_SECRET, "jwks": str(rsa_keys[2]), "audience": "casbah",
                         "scope-claim": "scp"}},
    }))
    server = Casbah(["--config", str(config), "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(root / "d"),
                     "--instance", "A", "--instance", "B"], root / "server.log").start()
    yield server
    server.stop()


def make_jwt(key, alg: str, scope: object, *, expires_in: float = 600, kid: str | None = "test-key",
             **claims) -> str:
    payload = {"sub": "ci@example.com", "aud": "casbah", "exp": int(time.time() + expires_in), "scp": scope, **claims}
    headers = {"kid": kid} if alg == "RS256" and kid else None
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def test_jwt_scopes(jwt_server: Casbah, rsa_keys) -> None:
    """HS256 (shared secret) and RS256 (JWKS file) tokens grant the scopes of their claim;
    expired, wrongly signed or wrong-audience tokens are UNAUTHENTICATED."""
    key, stranger, _ = rsa_keys
    cases = [
        # (token, instance, write RPC?, expected)
        (make_jwt(HS_SECRET, "HS256", "casbah:write"), "A", True, OK),
        (make_jwt(HS_SECRET, "HS256", "casbah:read"), "A", True, DENIED),
        (make_jwt(HS_SECRET, "HS256", "casbah:read"), "B", False, OK),
        (make_jwt(HS_SECRET, "HS256", ["write"], casbah_instances=["A"]), "A", True, OK),
        (make_jwt(HS_SECRET, "HS256", ["write"], casbah_instances=["A"]), "B", True, DENIED),
        (make_jwt(HS_SECRET, "HS256", ["write"], casbah_instances=["A"]), "B", False, DENIED),
        (make_jwt(HS_SECRET, "HS256", "openid profile"), "A", False, DENIED),  # no casbah scope at all
        (make_jwt(key, "RS256", "casbah:write"), "B", True, OK),
        (make_jwt(key, "RS256", "casbah:read"), "B", True, DENIED),
        (make_jwt(key, "RS256", "casbah:read"), "B", False, OK),
        # refused outright
        (make_jwt(HS_SECRET, "HS256", "casbah:write", expires_in=-60), "A", False, UNAUTHENTICATED),
        (make_jwt(key, "RS256", "casbah:write", expires_in=-60), "A", False, UNAUTHENTICATED),
        (make_jwt("another-secret-of-at-least-32-bytes!!", "HS256", "casbah:write"), "A", False, UNAUTHENTICATED),
        (make_jwt(stranger, "RS256", "casbah:write"), "A", False, UNAUTHENTICATED),
        (make_jwt(key, "RS256", "casbah:write", kid="unknown-key"), "A", False, UNAUTHENTICATED),
        (make_jwt(HS_SECRET, "HS256", "casbah:write", aud="someone-else"), "A", False, UNAUTHENTICATED),
        (jwt.encode({"aud": "casbah", "scp": "casbah:write"}, HS_SECRET, algorithm="HS256"), "A", False,
         UNAUTHENTICATED),  # no expiry: refused
        (jwt.encode({"aud": "casbah", "exp": int(time.time()) + 600, "scp": "casbah:write"}, None,
                    algorithm="none"), "A", False, UNAUTHENTICATED),
    ]
    with grpc.insecure_channel(jwt_server.address, options=OPTIONS) as channel:
        for number, (token, instance, write, want) in enumerate(cases):
            call = _batch_update if write else _find_missing
            got = code_of(lambda c=call, t=token, i=instance: c(channel, i, bearer(t)))
            assert got == want, f"case {number}: {got} != {want}"
    assert "DENIED BatchUpdateBlobs on instance 'B'" in jwt_server.log()
    assert "by jwt:ci@example.com" in jwt_server.log()


# --- mTLS subjects --------------------------------------------------------------------------------------------------


def test_subject_spellings_agree() -> None:
    """The forms of one subject that gRPC and `openssl x509 -subject` print compare equal."""
    grpc_form = parse_subject("O=Casbah Tests,CN=ci-reader")
    for spelling in ("CN=ci-reader,O=Casbah Tests", "CN = ci-reader, O = Casbah Tests", "/CN=ci-reader/O=Casbah Tests",
                     "cn=ci-reader, o=Casbah Tests"):
        assert parse_subject(spelling) == grpc_form, spelling
    assert parse_subject("CN=ci-reader") != grpc_form  # a whole DN is matched, not a part of it
    assert parse_subject(r"CN=a\,b,O=x") == (("CN", "a,b"), ("O", "x"))
    with pytest.raises(ValueError):
        parse_subject("ci-reader")


def test_mtls_subjects_map_to_scopes(launch, pki: Pki, tmp_path: Path) -> None:
    """`auth.mtls-subjects`: a whole DN (in any attribute order) or a bare common name grants
    scopes; a CA-signed client that is not listed is anonymous (here: nothing)."""
    config = tmp_path / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "listen": [f"127.0.0.1:{free_port()}"], "data-dir": str(tmp_path / "data"),
        "tls-cert": str(pki.server.cert), "tls-key": str(pki.server.key), "tls-client-ca": str(pki.ca),
        "auth": {"mtls-subjects": {"CN=ci-writer": "write", "CN=ci-reader, O=Casbah Tests": "read",
                                   "nobody-special": "read A"}},
    }))
    server = launch(["--config", str(config), "--instance", "A", "--instance", "B"])

    def channel(pair) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pair.key.read_bytes(), pair.cert.read_bytes())
        return grpc.secure_channel(server.address, creds, options=OPTIONS)

    with channel(pki.writer) as writer, channel(pki.reader) as reader, channel(pki.other) as other:
        assert code_of(lambda: _batch_update(writer, "B", ())) == OK
        assert code_of(lambda: _update_action_result(writer, "A", ())) == OK
        assert code_of(lambda: _find_missing(reader, "B", ())) == OK
        assert code_of(lambda: _batch_update(reader, "B", ())) == DENIED
        assert code_of(lambda: _bytestream_write(reader, "A", ())) == DENIED
        # CN=nobody is not listed: anonymous, and anonymous gets nothing once any method is configured.
        assert code_of(lambda: _find_missing(other, "A", ())) == UNAUTHENTICATED
        # A bearer token it does not know is refused even over a valid certificate.
        assert code_of(lambda: _find_missing(writer, "A", bearer(BOGUS_TOKEN))) == UNAUTHENTICATED
    assert re.search(r"WRITE BatchUpdateBlobs on instance 'B' [0-9a-f]{64}/64 by mtls:CN=ci-writer", server.log())
    assert "by mtls:CN=ci-reader, O=Casbah Tests (peer ipv4:127.0.0.1:" in server.log()


def test_mtls_common_name_mapping(launch, pki: Pki, tmp_path: Path) -> None:
    """A key without `=` is a common name: `nobody` (CN=nobody) gets read on A only."""
    config = tmp_path / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "listen": [f"127.0.0.1:{free_port()}"], "data-dir": str(tmp_path / "data"),
        "tls-cert": str(pki.server.cert), "tls-key": str(pki.server.key), "tls-client-ca": str(pki.ca),
        "auth": {"mtls-subjects": {"nobody": "read A"}, "anonymous": "none"},
    }))
    server = launch(["--config", str(config), "--instance", "A", "--instance", "B"])
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.other.key.read_bytes(), pki.other.cert.read_bytes())
    with grpc.secure_channel(server.address, creds, options=OPTIONS) as other:
        assert code_of(lambda: _find_missing(other, "A", ())) == OK
        assert code_of(lambda: _find_missing(other, "B", ())) == DENIED
        assert code_of(lambda: _batch_update(other, "A", ())) == DENIED


# --- anonymous policies and ActionCache poisoning defences ----------------------------------------------------------


def start_with_auth(launch, tmp_path: Path, auth: dict, *args: str) -> Casbah:
    config = tmp_path / "casbah.yaml"
    config.write_text(yaml.safe_dump({"listen": [f"127.0.0.1:{free_port()}"], "data-dir": str(tmp_path / "data"),
                                      "auth": auth}))
    return launch(["--config", str(config), *args])


def test_action_cache_writers_authenticated(launch, tmp_path: Path) -> None:
    """`action-cache-writers: authenticated`: anonymous read-write clients may upload blobs
    (CAS content is verified by its hash) but not ActionCache entries (which are not)."""
    tokens = write_tokens_file(tmp_path / "tokens")
    server = start_with_auth(launch, tmp_path, {"anonymous": "read-write", "action-cache-writers": "authenticated",
                                                "tokens": str(tokens)}, "--instance", "A")
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        assert code_of(lambda: _batch_update(channel, "A", ())) == OK
        assert code_of(lambda: _bytestream_write(channel, "A", ())) == OK
        assert code_of(lambda: _push_blob(channel, "A", ())) == OK
        assert code_of(lambda: _update_action_result(channel, "A", ())) == DENIED
        assert code_of(lambda: _get_action_result(channel, "A", ())) == NOT_FOUND  # reads stay open
        assert code_of(lambda: _update_action_result(channel, "A", bearer(WRITE_TOKEN))) == OK
    log = server.log()
    assert re.search(r"DENIED UpdateActionResult on instance 'A' action [0-9a-f]{64}/64 by anonymous .*"
                     r"action-cache-writers is 'authenticated'", log)
    assert not re.search(r"WRITE UpdateActionResult on instance 'A' .* by anonymous", log)
    assert re.search(r"WRITE UpdateActionResult on instance 'A' .* by token:", log)


def test_anonymous_read_only(launch, tmp_path: Path) -> None:
    """`anonymous: read-only` with no other method: reads work, every write RPC asks for credentials."""
    server = start_with_auth(launch, tmp_path, {"anonymous": "read-only"})
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        for rpc in RPCS:
            want = UNAUTHENTICATED if rpc.write else rpc.allowed
            assert code_of(lambda r=rpc: r.call(channel, "", ())) == want, rpc.name


def test_outputs_missing_means_no_hit(launch, tmp_path: Path) -> None:
    """An ActionResult whose output is not in CAS is never served, even to a writer who stored it."""
    server = start_with_auth(launch, tmp_path, {})
    data, output = fresh()
    action = fresh()[1]
    result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="out", digest=output)])
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        ac = re_grpc.ActionCacheStub(channel)
        ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result),
                              timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action), timeout=10)
        assert err.value.code() == NOT_FOUND
        re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=output, data=data)]), timeout=10)
        assert ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action), timeout=10) == result
    # With no auth configured every write is still audited, as anonymous.
    assert re.search(rf"WRITE UpdateActionResult on instance '' action {action.hash}/64 by anonymous", server.log())


def test_anonymous_access_can_differ_per_instance(launch, tmp_path: Path) -> None:
    """A token-protected server with one public, read-only instance: anonymous callers
    may read `public` but neither write it nor touch the default instance."""
    tokens = write_tokens_file(tmp_path / "tokens")
    config = tmp_path / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "auth": {"tokens": str(tokens)},
        "instances": {"": {}, "public": {"anonymous": "read-only"}},
    }))
    server = launch(["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"),
                     "--config", str(config)])
    with grpc.insecure_channel(server.address, options=OPTIONS) as ch:
        none: tuple = ()
        assert code_of(lambda: _find_missing(ch, "public", none)) == grpc.StatusCode.OK
        assert code_of(lambda: _batch_update(ch, "public", none)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: _find_missing(ch, "", none)) == grpc.StatusCode.UNAUTHENTICATED
        # A valid token still works on the public instance (its own scopes apply).
        assert code_of(lambda: _find_missing(ch, "public", bearer(READ_TOKEN))) == grpc.StatusCode.OK
