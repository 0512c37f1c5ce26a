"""Strict credentials: JWT claims of the wrong type and client certificates whose names
hide a NUL or control character are UNAUTHENTICATED, never a grant (issue 11, rows 6 and 7).

Real tokens (PyJWT, HS256) and real certificates signed by the session's test CA,
against a real `casbah serve` on loopback.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import grpc
import jwt
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from security_helpers import OPTIONS, Casbah, KeyPair, Pki, bearer, free_port, issue_client

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

SECRET = "a-shared-secret-of-at-least-32-bytes!"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def token(**claims: object) -> str:
    payload = {"sub": "ci@example.com", "exp": int(time.time() + 600), **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def fresh() -> tuple[bytes, re_pb2.Digest]:
    data = os.urandom(64)
    return data, re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def upload(channel: grpc.Channel, instance: str, metadata: tuple) -> tuple[re_pb2.Digest, grpc.StatusCode, str]:
    """BatchUpdateBlobs of one fresh blob: (its digest, the call's status, details)."""
    data, digest = fresh()
    try:
        response = re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            instance_name=instance, requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]),
            metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return digest, exc.code(), exc.details() or ""
    assert response.responses[0].status.code == 0, response
    return digest, grpc.StatusCode.OK, ""


def missing(channel: grpc.Channel, instance: str, digest: re_pb2.Digest, metadata: tuple = ()) -> bool:
    response = re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(instance_name=instance, blob_digests=[digest]), metadata=metadata, timeout=10)
    return list(response.missing_blob_digests) == [digest]


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("claims")
    config = root / "casbah.yaml"
    config.write_text(yaml.safe_dump({"auth": {"jwt": {"secret": SECRET}}}))
    server = Casbah(["--config", str(config), "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(root / "d"),
                     "--instance", "A", "--instance", "B"], root / "server.log").start()
    yield server
    server.stop()


BAD_CLAIMS = [
    # (claims, the claim the refusal must name)
    ({"scope": "casbah:write", "casbah_instances": None}, "casbah_instances"),
    ({"scope": "casbah:write", "casbah_instances": {}}, "casbah_instances"),
    ({"scope": "casbah:write", "casbah_instances": 0}, "casbah_instances"),
    ({"scope": "casbah:write", "casbah_instances": {"A": True}}, "casbah_instances"),
    ({"scope": "casbah:write", "casbah_instances": ["A", 1]}, "casbah_instances"),
    ({"scope": {"write": 1}}, "scope"),
    ({"scope": {"casbah:write": True}, "casbah_instances": ["A"]}, "scope"),
    ({"scope": 7}, "scope"),
    ({"scope": None}, "scope"),
    ({"scope": ["casbah:write", 3]}, "scope"),
    ({"scope": "casbah:write", "sub": "ci\nWRITE forged audit line"}, "sub"),
]


@pytest.mark.parametrize(("claims", "named"), BAD_CLAIMS, ids=[repr(c) for c, _ in BAD_CLAIMS])
def test_ill_typed_jwt_claims_are_unauthenticated(jwt_server: Casbah, claims: dict, named: str) -> None:
    """Row 6: `casbah_instances` null / {} / 0 used to mean every instance, `scope: {"write": 1}`
    granted write and `scope: 7` answered INTERNAL.  Each is now UNAUTHENTICATED naming the
    claim, for reads and writes alike, with an audit line, and nothing is stored."""
    bad = bearer(token(**claims))
    good = bearer(token(scope="casbah:read"))
    with grpc.insecure_channel(jwt_server.address, options=OPTIONS) as channel:
        for instance in ("A", "B"):
            digest, code, details = upload(channel, instance, bad)
            assert code == UNAUTHENTICATED, (claims, code, details)
            assert f"JWT claim {named!r}" in details, details
            assert missing(channel, instance, digest, good)  # no access: nothing was written
            with pytest.raises(grpc.RpcError) as err:
                missing(channel, instance, digest, bad)
            assert err.value.code() == UNAUTHENTICATED
    log = jwt_server.log()
    assert "by unauthenticated caller (peer ipv4:127.0.0.1:" in log
    assert f"JWT claim {named!r} must be" in log
    assert "\nWRITE forged" not in log  # a newline in a claim never starts a line of its own


def test_well_typed_jwt_claims_still_grant(jwt_server: Casbah) -> None:
    """The accepted forms keep their meaning: absent instances = every instance, a list
    limits, a lone string names one instance; scope as a string or a list of strings."""
    with grpc.insecure_channel(jwt_server.address, options=OPTIONS) as channel:
        for claims, instance, want in [
            ({"scope": "casbah:write"}, "B", grpc.StatusCode.OK),
            ({"scope": ["write"], "casbah_instances": ["A"]}, "A", grpc.StatusCode.OK),
            ({"scope": ["write"], "casbah_instances": ["A"]}, "B", grpc.StatusCode.PERMISSION_DENIED),
            ({"scope": "casbah:write", "casbah_instances": "B"}, "B", grpc.StatusCode.OK),
            ({"scope": "casbah:write", "casbah_instances": []}, "A", grpc.StatusCode.PERMISSION_DENIED),
            ({"scope": []}, "A", grpc.StatusCode.PERMISSION_DENIED),
            ({}, "A", grpc.StatusCode.PERMISSION_DENIED),  # no scope claim: authenticated, no scopes
        ]:
            _, code, details = upload(channel, instance, bearer(token(**claims)))
            assert code == want, (claims, instance, details)


# --- mTLS names from the parsed certificate -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clients(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    """CA-signed client certificates, some with names no honest CA would issue."""
    directory = tmp_path_factory.mktemp("clients")

    def name(*attrs: tuple) -> x509.Name:
        return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])

    return {
        "farm": issue_client(pki, directory, "farm", name((NameOID.COMMON_NAME, "build-farm"))),
        "nul": issue_client(pki, directory, "nul", name((NameOID.COMMON_NAME, "build-farm\x00x"))),
        "control": issue_client(pki, directory, "control", name((NameOID.COMMON_NAME, "build-farm\x01"))),
        "nul-org": issue_client(pki, directory, "nul-org", name((NameOID.COMMON_NAME, "mailer"),
                                                                 (NameOID.ORGANIZATION_NAME, "Example\x00Evil"))),
        "mailer": issue_client(pki, directory, "mailer", name((NameOID.COMMON_NAME, "mailer"),
                                                               (NameOID.EMAIL_ADDRESS, "ci@example.com"))),
    }


def test_certificate_names_come_from_the_certificate(launch, pki: Pki, clients: dict[str, KeyPair],
                                                     tmp_path: Path) -> None:
    """Row 7: a CA-signed certificate with CN `build-farm\\0x` matched the identity `build-farm`
    (gRPC's x509_common_name stops at the NUL).  The name is now read from the parsed
    certificate: NUL and other control characters are refused as UNAUTHENTICATED."""
    config = tmp_path / "casbah.yaml"
    config.write_text(yaml.safe_dump({
        "listen": [f"127.0.0.1:{free_port()}"], "data-dir": str(tmp_path / "data"),
        "tls-cert": str(pki.server.cert), "tls-key": str(pki.server.key), "tls-client-ca": str(pki.ca),
        "auth": {"mtls-subjects": {"build-farm": "write", "CN=mailer,O=Example": "write",
                                   "emailAddress=ci@example.com, CN=mailer": "read"}},
    }))
    server = launch(["--config", str(config)])

    def channel(pair: KeyPair) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pair.key.read_bytes(), pair.cert.read_bytes())
        return grpc.secure_channel(server.address, creds, options=OPTIONS)

    with channel(clients["farm"]) as farm:
        digest, code, _ = upload(farm, "", ())
        assert code == grpc.StatusCode.OK
        assert not missing(farm, "", digest)
    for which in ("nul", "control", "nul-org"):
        with channel(clients[which]) as impostor, channel(clients["farm"]) as farm:
            digest, code, details = upload(impostor, "", ())
            assert code == UNAUTHENTICATED, (which, code, details)
            assert "contains a control character" in details, details
            assert missing(farm, "", digest)  # nothing stored
            with pytest.raises(grpc.RpcError) as err:
                missing(impostor, "", digest)
            assert err.value.code() == UNAUTHENTICATED
    # A whole DN with an attribute OpenSSL names `emailAddress` matches as configured: read only.
    with channel(clients["mailer"]) as mailer:
        digest, code, _ = upload(mailer, "", ())
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert missing(mailer, "", digest)
    log = server.log()
    assert "DENIED BatchUpdateBlobs on instance '' " in log
    assert "subject attribute CN contains a control character ('build-farm\\x00x')" in log
    assert "by mtls:build-farm" in log
    assert "by mtls:emailAddress=ci@example.com, CN=mailer (peer" in log
