"""Shared by the security tests: test PKI, a server process that may listen on TLS or
unix sockets, tokens and audit-log helpers.

Certificates are generated per test session with `cryptography`, so no key material
lives in the repository and expiry can never break the suite.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


# --- certificates -----------------------------------------------------------------------------------------------


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _cert(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool = False,
          sans: list[x509.GeneralName] | None = None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class KeyPair:
    cert: Path
    key: Path


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates."""

    ca: Path
    ca_key: Path  # to issue more client certificates (issue_client)
    server: KeyPair
    writer: KeyPair  # CA-signed, subject CN=ci-writer
    reader: KeyPair  # CA-signed, subject CN=ci-reader,O=Casbah Tests
    other: KeyPair  # CA-signed, subject CN=nobody (no mapping)
    rogue: KeyPair  # self-signed, subject CN=ci-writer: same name, wrong issuer


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("casbah test CA")
    ca_cert = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, directory / "ca.key")

    def issue(stem: str, subject: x509.Name, *, self_signed: bool = False, server: bool = False) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if server else None
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        if self_signed:
            cert = _cert(subject, key, subject, key, sans=sans, usage=usage)
        else:
            cert = _cert(subject, key, ca_name, ca_key, sans=sans, usage=usage)
        pair = KeyPair(directory / f"{stem}.pem", directory / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key)
        return pair

    return Pki(
        ca=ca_path,
        ca_key=directory / "ca.key",
        server=issue("server", _name("localhost"), server=True),
        writer=issue("writer", _name("ci-writer")),
        reader=issue("reader", _name("ci-reader", "Casbah Tests")),
        other=issue("other", _name("nobody")),
        rogue=issue("rogue", _name("ci-writer"), self_signed=True),
    )


def issue_client(pki: Pki, directory: Path, stem: str, subject: x509.Name) -> KeyPair:
    """A client certificate for any subject (even one no honest CA would sign), signed by the test CA."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(subject, key, ca_cert.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pair = KeyPair(directory / f"{stem}.pem", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- server processes ---------------------------------------------------------------------------------------------


class Casbah:
    """`casbah serve ARGS` as a child process, ready once it printed every address it serves.

    Unlike tests/conftest.py's ServerProcess it does not probe with a plaintext
    channel, so it works for TLS-only and unix-socket listeners.
    """

    def __init__(self, args: list[str], log_path: Path, listeners: int = 1) -> None:
        self.args = args
        self.log_path = log_path
        self.listeners = listeners
        self.proc: subprocess.Popen | None = None
        self.urls: list[str] = []

    def start(self, timeout: float = 30.0) -> Casbah:
        with open(self.log_path, "ab") as log:
            start = log.tell()  # a restart appends: only this run's lines count
            self.proc = subprocess.Popen([sys.executable, "-m", "casbah", "serve", *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"casbah exited with {self.proc.returncode}:\n{self.log()}")
            self.urls = re.findall(r"serving REAPI on (\S+) ", self.log()[start:])
            if len(self.urls) >= self.listeners:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"casbah did not start:\n{self.log()}")

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def address(self) -> str:
        return self.url.split("://", 1)[-1]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code


def cli(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `casbah` command line (a real process, as a user would)."""
    return subprocess.run([sys.executable, "-m", "casbah", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})


# --- tokens ---------------------------------------------------------------------------------------------------------


def token_hash(token: str) -> str:
    """What the tokens file holds for a token: `printf %s "$TOKEN" | sha256sum`."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
