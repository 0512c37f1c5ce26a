"""Checks before grpc binds a listener, so a failure says what really failed.

grpc reports every bind failure as "Failed to bind to address" (and logs raw
`E… add_port.cc` lines on stderr), whether the port is taken, the address is
not one of this machine's, or the TLS certificate is garbage.  Probing the same
bind with a plain socket, and loading the certificate and key with `ssl`, first
gives the real reason while grpc is still silent.
"""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path

from casbah.errors import StartupError

_REASONS = {
    errno.EADDRINUSE: "the address is already in use (is another server listening on port {port}?)",
    errno.EADDRNOTAVAIL: "cannot assign requested address ({host} is not an address of this machine)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def check_bind(address: str, reuse_port: bool = False) -> None:
    """Raise StartupError if no address `HOST:PORT` resolves to can be bound (grpc
    serves if any can).  unix: sockets are checked by the caller."""
    if address.startswith("unix:"):
        return
    host_text, _, port_text = address.rpartition(":")
    host, port = host_text.strip("[]"), int(port_text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address}: cannot resolve {host!r} ({exc.strerror})") from None
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As grpc does: a port left in TIME_WAIT by a stopped server is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(sockaddr)
                return
            except OSError as exc:
                failures.append(exc)
    if not failures:
        raise StartupError(f"cannot listen on {address}: {host!r} resolves to no address")
    first = failures[0]
    reason = _REASONS.get(first.errno or 0, first.strerror or str(first))
    raise StartupError(f"cannot listen on {address}: {reason.format(host=host, port=port)}")


def _pem(path: str, marker: bytes, what: str) -> None:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise StartupError(f"TLS {what} {path} is not a PEM {what}")


def check_tls(cert: str, key: str, client_ca: str | None) -> None:
    """Raise StartupError naming the file if the certificate, key or client CA cannot be used."""
    _pem(cert, b"CERTIFICATE-----", "certificate")
    _pem(key, b"PRIVATE KEY-----", "private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).replace("_", " ").lower()
        raise StartupError(f"bad TLS certificate {cert} or key {key}: {reason}") from None
    if client_ca:
        _pem(client_ca, b"CERTIFICATE-----", "client CA")
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise StartupError(f"bad TLS client CA {client_ca}: {exc.reason or exc}") from None
