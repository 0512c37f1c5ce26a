"""Client side of REAPI: connecting to a server described by a remote spec.

A remote spec is what users write in config or on the command line: a URL
(`grpc://host:port`, `grpcs://host:port`, `unix:/path`), an instance name, TLS
material and a token file.  Everything client-side (CLI, local cache sync,
sources, the `remote` storage backend) opens channels through `open_channel`, so
TLS and credentials behave the same everywhere.

A URL must name its port (`grpc://127.0.0.1` is refused rather than silently
meaning port 80): REAPI servers listen on no standard port, so a guessed one is
a confusing "connection refused" later.  Every call carries the REAPI
`RequestMetadata` header naming casbah, its version and one invocation id per
process (one command run), so a server's logs and status page can tell casbah's
traffic apart.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import grpc

from casbah.errors import InvalidArgument

#: Big enough for any batch a server advertises; grpc's 4 MiB default is too small.
MAX_MESSAGE = 64 * 1024 * 1024

REQUEST_METADATA_KEY = "build.bazel.remote.execution.v2.requestmetadata-bin"
#: One id per process: every call of one `casbah …` command run shares it.
INVOCATION_ID = str(uuid.uuid4())


@lru_cache(maxsize=1)
def request_metadata() -> bytes:
    """The serialized `RequestMetadata` every call of this process sends."""
    from casbah import __version__
    from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    return re_pb2.RequestMetadata(
        tool_details=re_pb2.ToolDetails(tool_name="casbah", tool_version=__version__),
        tool_invocation_id=INVOCATION_ID,
    ).SerializeToString()


@dataclass(frozen=True)
class RemoteSpec:
    url: str
    instance: str = ""
    server_cert: str | None = None
    client_key: str | None = None
    client_cert: str | None = None
    token_file: str | None = None
    push: bool = False

    def __post_init__(self) -> None:
        self.target()  # a bad URL fails where it is given, not at the first call

    def target(self) -> tuple[str, bool]:
        """(gRPC target, secure?) from the URL."""
        if self.url.startswith("unix:"):
            if not self.url.removeprefix("unix:").removeprefix("//"):
                raise InvalidArgument(f"remote URL {self.url!r}: a unix socket needs a path (unix:PATH)")
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
        try:
            port = parsed.port
        except ValueError:
            raise InvalidArgument(f"remote URL {self.url!r}: the port is not a number from 0 to 65535") from None
        if not port:
            raise InvalidArgument(f"remote URL {self.url!r} needs a port ({parsed.scheme}://HOST:PORT; "
                                  "casbah serves on 50051 by default)")
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

    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """What every call sends: RequestMetadata, and the bearer token if any."""
        tool: tuple[str, str | bytes] = (REQUEST_METADATA_KEY, request_metadata())
        if not self.token_file:
            return (tool,)
        token = Path(self.token_file).read_text().strip()
        return (tool, ("authorization", f"Bearer {token}"))


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
