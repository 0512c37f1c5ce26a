"""Operations without restarts: reloading TLS certificates and the tokens file, and purging
expired Remote Asset entries, in the background of a running server.

- **Certificates** are served through gRPC's dynamic credentials: on every new TLS
  handshake gRPC asks the listener's `TlsFiles` for a newer configuration, which it
  has once a reload read changed files.  Connections already open keep theirs.
- **Tokens**: the file is read again into the same `Authorizer`; a file that does not
  load (a typo while editing) is logged and the old tokens stay, so a bad edit never
  locks everybody out.
- **When**: on SIGHUP, and when a watched file's modification time changes (polled
  every `reload-interval` seconds: no inotify dependency, and a few seconds of delay
  are fine for a certificate rotation).
- **Expired assets** are deleted every `asset-purge-interval` seconds from every
  instance's index (`AssetIndex.purge_expired`); lookups skip them meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import grpc

from casbah.server.auth import Authorizer

log = logging.getLogger("casbah.server")


def _mtime(path: str | None) -> float | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


class TlsFiles:
    """One listener's certificate, key and client CA, reloadable while serving."""

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()  # the fetcher runs on a gRPC thread
        self._material = self._read()
        self.current = self._configuration(self._material)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._mtimes = self._stat()

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        return (Path(self.key).read_bytes(), Path(self.cert).read_bytes(),
                Path(self.client_ca).read_bytes() if self.client_ca else None)

    @staticmethod
    def _configuration(material: tuple[bytes, bytes, bytes | None]) -> grpc.ServerCertificateConfiguration:
        key, cert, ca = material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _stat(self) -> tuple:
        return (_mtime(self.cert), _mtime(self.key), _mtime(self.client_ca))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.current, self._fetch,
                                                   require_client_authentication=bool(self.client_ca))

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration once, else None (unchanged)."""
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def changed(self) -> bool:
        return self._stat() != self._mtimes

    def reload(self) -> bool:
        """Read the files again; True when they changed.  Raises OSError/ValueError when
        they cannot be read or do not parse (the old ones stay in use)."""
        self._mtimes = self._stat()
        material = self._read()
        if material == self._material:
            return False
        _check_pair(material)
        configuration = self._configuration(material)
        with self._lock:
            self._material, self.current, self._pending = material, configuration, configuration
        return True


def _check_pair(material: tuple[bytes, bytes, bytes | None]) -> None:
    """Refuse a certificate and key that do not parse or do not belong together (a rotation
    caught halfway: the new certificate written, the old key still there)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key, cert, _ = material
    private = serialization.load_pem_private_key(key, password=None)
    public = x509.load_pem_x509_certificate(cert).public_key()
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.PEM, raw) != \
            public.public_bytes(serialization.Encoding.PEM, raw):
        raise ValueError("the certificate does not match the key")


class Reloader:
    """Reloads the listeners' TLS files and the tokens file on SIGHUP and on change."""

    def __init__(self, authorizer: Authorizer, tokens: str | None, tls: list[TlsFiles],
                 interval: float) -> None:
        self.authorizer = authorizer
        self.tokens = tokens
        self.tls = tls
        self.interval = interval
        self._tokens_mtime = _mtime(tokens)

    def reload(self, why: str) -> None:
        for files in self.tls:
            try:
                if files.reload():
                    log.info("%s: reloaded TLS certificate %s (new connections use it)", why, files.cert)
            except (OSError, ValueError) as exc:
                log.error("%s: cannot reload TLS certificate %s, keeping the current one: %s", why, files.cert, exc)
        if self.tokens is not None:
            self._tokens_mtime = _mtime(self.tokens)
            try:
                count = self.authorizer.reload_tokens(self.tokens)
            except Exception as exc:  # any load error: the old tokens stay
                log.error("%s: cannot reload the tokens file %s, keeping the current tokens: %s", why, self.tokens,
                          exc)
            else:
                log.info("%s: reloaded the tokens file %s (%d tokens)", why, self.tokens, count)

    def changed(self) -> bool:
        return any(f.changed() for f in self.tls) or (self.tokens is not None
                                                        and _mtime(self.tokens) != self._tokens_mtime)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.changed():
                self.reload("file change")


async def purge_assets(instances, interval: float) -> None:
    """Every `interval` seconds, delete expired records from every instance's asset index."""
    while True:
        await asyncio.sleep(interval)
        for instance in instances:
            index = instance.extras["asset"].index
            try:
                purged = await index.purge_expired(time.time())
            except Exception as exc:  # an index that is down now is tried again next time
                log.warning("instance %r: purging expired assets failed: %s", instance.name, exc)
                continue
            if purged:
                log.info("instance %r: purged %d expired asset(s)", instance.name, purged)


async def cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
