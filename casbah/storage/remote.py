"""`remote`: every storage call forwarded to another REAPI server.

This module only adapts the one CAS client (`casbah.reapi.cas`) to `Storage`;
the rules below are the client's.

- existence: FindMissingBlobs in groups that fit a message (one digest function
  a request), run concurrently;
- small blobs: BatchReadBlobs / BatchUpdateBlobs sized by the remote's
  `max_batch_total_size_bytes` (a safe default when it does not say);
- large blobs: ByteStream in 1 MiB messages both ways, never whole in memory; a
  read that loses its connection, stalls, or ends short resumes from the offset
  already delivered;
- zstd on the wire when the remote advertises it (`compression: auto`);
- delete and iterate are not part of REAPI: they raise Unsupported;
- content-defined chunking (`casbah.reapi.chunked`) when the remote advertises it: a
  large write is spooled to a temporary file (verified as it arrives, never held in
  memory), cut with the remote's FastCDC parameters, and only the chunks the remote
  lacks are sent before a SpliceBlob; `upstream_chunks` answers the remote's SplitBlob,
  so an edge's spliced layer fetches only the chunks its local side lacks.

Every blob read from the upstream is verified before it is passed on (unless the
node is `verify: false`): a batch hashes each blob, and one that fails is lost
alone (`BlobsLost`, DATA_LOSS for that blob); a stream hashes as it goes and
yields its last chunk only after the whole blob matched, so a lying upstream
never gets a complete wrong blob to a client with success, nor into a cache.
A ranged read fetches the whole blob to verify it and passes on only the range.

Unary calls and writes of blobs held in memory (`write_bytes`, `write_many`) are
retried on transient failures.  A streamed `write` is not: its source (a
client's upload) cannot be replayed, so it fails with the transient status
(UNAVAILABLE) and the client retries, as Bazel does.  Nothing partial is ever
stored: the remote only commits an upload once `finish_write` arrived and the
digest verified, and `finish_write` is sent only after the stream verified here.

`request-timeout` bounds each unary call, the wait for each message of a read,
and the time a write may go without the remote accepting data (a hung remote
cannot hold a request forever).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

from pydantic import Field

from casbah.config import ConfigError
from casbah.digest import Digest
from casbah.errors import BlobNotFound, InvalidArgument, Unsupported
from casbah.reapi import chunked
from casbah.reapi.cas import CasClient
from casbah.reapi.channel import RemoteSpec
from casbah.reapi.connection import AsyncRemote
from casbah.reapi.retry import RetryPolicy
from casbah.registry import KindOptions
from casbah.storage.base import BlobInfo, Storage, check_range, found_or_lost
from casbah.storage.loader import NodeOptions, register
from casbah.streams import file_chunks, write_all


class RemoteStorage(Storage):
    kind = "remote"

    def __init__(self, remote: AsyncRemote, compression_mode: str = "auto", spool_dir: str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.remote = remote
        self.client = CasClient(remote, compression_mode)
        #: Where a large write is spooled before it is chunked (None: the system's temp dir).
        self.spool_dir = spool_dir

    def describe(self) -> str:
        return f"remote({self.remote.describe()})"

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        return await self.client.find_missing(digests)

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        expected = check_range(digest, digest.size, offset, limit)
        # Verified: the whole blob, whatever the range (only the whole can be verified).
        verifier = self.read_verifier(digest) if self.verify else None
        return await self.client.read(digest, offset, limit, expected, verifier)

    async def read_bytes(self, digest: Digest) -> bytes:
        found = await self.read_many([digest])
        if digest not in found:
            raise BlobNotFound(digest, f"not on {self.remote.describe()}")
        return found[digest]

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found, lost = await self.client.read_many(digests, self.verify, self.describe())
        return found_or_lost(found, lost)

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        caps = await self.client.capabilities()
        if self.verify and caps.splice and chunked.worth_chunking(caps.cdc, digest.size):
            await self._write_chunked(digest, chunks)
            return
        await self.client.write(digest, chunks, self.verifier(digest))

    async def _write_chunked(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        """Spool (verified), then only the chunks the remote lacks + SpliceBlob; a remote
        that refuses the splice gets the spooled file over ByteStream, which, unlike a
        one-shot stream, can resume after a transient failure."""
        if self.spool_dir is not None:
            await asyncio.to_thread(os.makedirs, self.spool_dir, exist_ok=True)
        spool = await asyncio.to_thread(tempfile.NamedTemporaryFile, "w+b", dir=self.spool_dir,
                                        prefix="casbah-splice-")
        try:
            verifier = self.verifier(digest)
            async for piece in chunks:
                verifier.update(piece)
                await asyncio.to_thread(write_all, spool.fileno(), piece)
            verifier.finish()  # a wrong upload is refused before anything reaches the remote
            path = Path(spool.name)
            if await chunked.upload_chunked(self.client, digest, path) is None:
                await self.client.write_reopenable(digest, lambda offset: file_chunks(path, offset))
        finally:
            await asyncio.to_thread(spool.close)

    async def upstream_chunks(self, digest: Digest) -> list[Digest] | None:
        return await chunked.split(self.client, digest)

    async def splice_upstream(self, digest: Digest, chunks: Sequence[Digest]) -> bool | None:
        return await chunked.splice(self.client, digest, chunks)

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        results = await self.write_many([(digest, data)])
        if results[0] is not None:
            raise results[0]

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        return await self.client.write_many(blobs, self.verify)

    async def delete(self, digests: Sequence[Digest]) -> int:
        raise Unsupported(f"remote storage {self.remote.describe()} cannot delete: REAPI has no delete call")

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        raise Unsupported(f"remote storage {self.remote.describe()} cannot list its blobs: REAPI has no such call")
        yield  # pragma: no cover

    async def close(self) -> None:
        await self.client.close()


class RemoteConnectionOptions(KindOptions):
    """How to reach an upstream: shared by the storage, ActionCache and asset-index `remote` kinds."""

    url: str
    instance: str = ""
    retries: int = Field(default=3, ge=0)
    max_backoff: float = Field(default=5.0, alias="max-backoff", gt=0)
    request_timeout: float = Field(default=60.0, alias="request-timeout", gt=0)
    channel_options: dict[str, int | str] = Field(default_factory=dict, alias="channel-options")
    server_cert: str | None = Field(default=None, alias="server-cert")
    client_key: str | None = Field(default=None, alias="client-key")
    client_cert: str | None = Field(default=None, alias="client-cert")
    token_file: str | None = Field(default=None, alias="token-file")


class RemoteOptions(RemoteConnectionOptions, NodeOptions):
    compression: str = Field(default="auto", pattern="^(auto|zstd|identity)$")
    spool_dir: str | None = Field(default=None, alias="spool-dir")


def remote_from_options(options: RemoteConnectionOptions, where: str = "remote") -> AsyncRemote:
    """Shared by the storage, ActionCache and asset-index `remote` kinds."""
    spec = RemoteSpec(url=options.url, instance=options.instance, server_cert=options.server_cert,
                      client_key=options.client_key, client_cert=options.client_cert,
                      token_file=options.token_file)
    try:
        spec.target()  # a malformed URL is a config error at startup, not at the first request
    except InvalidArgument as exc:
        raise ConfigError(f"{where}.url: {exc}") from None
    for key, file in (("server-cert", spec.server_cert), ("client-key", spec.client_key),
                      ("client-cert", spec.client_cert), ("token-file", spec.token_file)):
        if file is not None and not os.access(file, os.R_OK):
            raise ConfigError(f"{where}.{key}: cannot read {file}")
    if (spec.client_key is None) != (spec.client_cert is None):
        raise ConfigError(f"{where}: client-key and client-cert go together (mutual TLS)")
    policy = RetryPolicy(retries=options.retries, max_backoff=options.max_backoff,
                         request_timeout=options.request_timeout)
    return AsyncRemote(spec, policy, list(options.channel_options.items()))


@register("remote", RemoteOptions)
def _build(options: RemoteOptions, loader: object, path: str) -> RemoteStorage:
    return RemoteStorage(remote_from_options(options, path), options.compression, options.spool_dir, name=path,
                         verify=options.verify)
