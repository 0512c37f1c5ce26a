"""The HTTP front over TLS with the gRPC listeners' certificates, and mTLS subjects as identities."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import requests
import yaml
from security_helpers import Pki, free_port


def _serve(launch, pki: Pki, tmp_path: Path, mtls: bool) -> str:
    http = free_port()
    config = {"listen": [f"127.0.0.1:{free_port()}"], "tls-cert": str(pki.server.cert),
              "tls-key": str(pki.server.key), "http-listen": f"127.0.0.1:{http}", "data-dir": str(tmp_path / "d")}
    if mtls:
        config["tls-client-ca"] = str(pki.ca)
        config["auth"] = {"mtls-subjects": {"ci-writer": "write", "CN=ci-reader,O=Casbah Tests": "read"}}
    path = tmp_path / "casbah.yaml"
    path.write_text(yaml.safe_dump(config))
    server = launch(["--config", str(path)])
    assert f"serving the HTTP cache protocol on https://127.0.0.1:{http}" in server.log()
    return f"https://127.0.0.1:{http}"


def test_https_with_the_server_certificate(launch, pki: Pki, tmp_path: Path) -> None:
    base = _serve(launch, pki, tmp_path, mtls=False)
    data = os.urandom(300)
    url = f"{base}/cas/{hashlib.sha256(data).hexdigest()}"
    assert requests.put(url, data=data, verify=str(pki.ca)).status_code == 200
    assert requests.get(url, verify=str(pki.ca)).content == data
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url)  # the system's CAs do not know the test CA
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url.replace("https://", "http://"), timeout=5)  # no plaintext on the TLS port


def test_mtls_subjects_are_identities_over_http(launch, pki: Pki, tmp_path: Path) -> None:
    base = _serve(launch, pki, tmp_path, mtls=True)
    data = os.urandom(300)
    url = f"{base}/cas/{hashlib.sha256(data).hexdigest()}"
    writer = (str(pki.writer.cert), str(pki.writer.key))
    reader = (str(pki.reader.cert), str(pki.reader.key))
    other = (str(pki.other.cert), str(pki.other.key))
    assert requests.put(url, data=data, verify=str(pki.ca), cert=reader).status_code == 403
    assert requests.put(url, data=data, verify=str(pki.ca), cert=writer).status_code == 200
    assert requests.get(url, verify=str(pki.ca), cert=reader).content == data
    assert requests.get(url, verify=str(pki.ca), cert=other).status_code == 401  # CA-signed, not mapped
    for rogue in (None, (str(pki.rogue.cert), str(pki.rogue.key))):
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            requests.get(url, verify=str(pki.ca), cert=rogue)
