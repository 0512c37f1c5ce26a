"""Client side of REAPI: connecting to a server described by a remote spec.

A remote spec is what users write in config or on the command line: a URL
(`grpc://host:port`, `grpcs://host:port`, `unix:/path`), an instance name, TLS
material and a token file.  Everything client-side (CLI, local cache sync,
sources, the `remote` storage backend) opens channels through `open_channel`, so
TLS and credentials behave the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import grpc

from casbah.errors import InvalidArgument

#: Big enough for any batch a server advertises; grpc's 4 MiB default is too small.
MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True)
class RemoteSpec:
    url: str
    instance: str = ""
    server_cert: str | None = None
    client_key: str | None = None
    client_cert: str | None = None
    token_file: str | None = None
    push: bool = False

    def target(self) -> tuple[str, bool]:
        """(gRPC target, secure?) from the URL."""
        if self.url.startswith("unix:"):
            return self.url, False
        parsed = urlparse(self.url)
        if parsed.scheme in ("grpc", "http"):
            secure = False
        elif parsed.scheme in ("grpcs", "https"):
            secure = True
        else:
            raise InvalidArgument(f"remote URL {self.url!r}: use grpc://, grpcs:// or unix:")
        if not parsed.hostname:
            raise InvalidArgument(f"remote URL {self.url!r} has no host")
        port = parsed.port or (443 if secure else 80)
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        return f"{host}:{port}", secure

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.server_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.token_file:
            return ()
        token = Path(self.token_file).read_text().strip()
        return (("authorization", f"Bearer {token}"),)


def channel_options(extra: list[tuple[str, object]] | None = None) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        *(extra or []),
    ]


def open_channel(spec: RemoteSpec, extra_options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """A synchronous channel (CLI, local cache)."""
    target, secure = spec.target()
    options = channel_options(extra_options)
    if secure:
        return grpc.secure_channel(target, spec.credentials(), options=options)
    return grpc.insecure_channel(target, options=options)


def open_aio_channel(spec: RemoteSpec, extra_options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
    """An asyncio channel (server-side backends)."""
    target, secure = spec.target()
    options = channel_options(extra_options)
    if secure:
        return grpc.aio.secure_channel(target, spec.credentials(), options=options)
    return grpc.aio.insecure_channel(target, options=options)
