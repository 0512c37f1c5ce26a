"""A synchronous REAPI client: what the local cache, the CLI and the source cache use.

It probes Capabilities once (batch limit, zstd, digest functions; servers without
Capabilities get safe defaults), asks FindMissingBlobs in bounded groups, moves
small blobs in batches sized by the server's limit and large ones over ByteStream
in 1 MiB chunks (a broken download resumes at the offset it reached, a broken
upload at the server's `committed_size`), runs requests on a bounded pool of
threads, and retries transient failures with backoff.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import code_pb2

from casbah.client.channel import RemoteSpec, open_channel
from casbah.client.retry import TRANSIENT, RetryPolicy
from casbah.digest import Digest, DigestFunction
from casbah.errors import (
    AssetNotFound,
    BlobNotFound,
    DigestMismatch,
    NotFound,
    Unsupported,
    code_from_int,
    from_status,
)
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.storage.base import CHUNK_SIZE, Verifier

__all__ = ["RemoteClient", "RemoteSpec", "open_channel"]

log = logging.getLogger(__name__)

SAFE_BATCH_SIZE = 2 * 1024 * 1024
FMB_GROUP = 10_000
#: Per-blob protobuf overhead counted against the batch limit (digest + framing).
BLOB_OVERHEAD = 128

#: Where a blob comes from on upload: its bytes, or a file to stream.
Source = bytes | Path


@dataclass
class Transfer:
    """Counts for summaries and progress bars; updated from worker threads."""

    blobs: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, blobs: int, nbytes: int) -> None:
        with self._lock:
            self.blobs += blobs
            self.bytes += nbytes


Progress = Callable[[int, int], None]  # (blobs, bytes) just completed


class RemoteClient:
    def __init__(self, spec: RemoteSpec, policy: RetryPolicy | None = None, parallelism: int = 4) -> None:
        self.spec = spec
        self.policy = policy or RetryPolicy()
        self.parallelism = parallelism
        self.channel = open_channel(spec)
        self.metadata = spec.metadata()
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)
        self.action_cache = re_grpc.ActionCacheStub(self.channel)
        self.fetch = ra_grpc.FetchStub(self.channel)
        self.push = ra_grpc.PushStub(self.channel)
        self.references = bst_grpc.ReferenceStorageStub(self.channel)
        # BatchUpdateBlobs with the request already in wire form (see encode_batch_update).
        self._batch_update_raw = self.channel.unary_unary(
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
            request_serializer=None, response_deserializer=re_pb2.BatchUpdateBlobsResponse.FromString,
        )
        self._caps: re_pb2.CacheCapabilities | None = None
        self._pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="casbah-remote")
        self.uploaded = Transfer()
        self.downloaded = Transfer()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.channel.close()

    @property
    def instance(self) -> str:
        return self.spec.instance

    def _call(self, method, request, what: str, idempotent: bool = True):
        return self.policy.call_sync(
            lambda: method(request, metadata=self.metadata, timeout=self.policy.request_timeout),
            f"{what} on {self.spec.url}", idempotent,
        )

    # -- capabilities --------------------------------------------------------------

    def capabilities(self) -> re_pb2.CacheCapabilities:
        if self._caps is None:
            stub = re_grpc.CapabilitiesStub(self.channel)
            try:
                caps = self._call(stub.GetCapabilities, re_pb2.GetCapabilitiesRequest(instance_name=self.instance),
                                  "GetCapabilities").cache_capabilities
            except Unsupported:
                caps = re_pb2.CacheCapabilities()
            self._caps = caps
        return self._caps

    @property
    def batch_limit(self) -> int:
        return min(self.capabilities().max_batch_total_size_bytes or SAFE_BATCH_SIZE, 16 * 1024 * 1024)

    # -- existence -----------------------------------------------------------------

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        unique = list(dict.fromkeys(d for d in digests if d.size))
        groups = [unique[i : i + FMB_GROUP] for i in range(0, len(unique), FMB_GROUP)]
        missing: list[Digest] = []
        for result in self._pool.map(self._find_missing, groups):
            missing.extend(result)
        return missing

    def _find_missing(self, digests: list[Digest]) -> list[Digest]:
        fn = digests[0].function
        request = re_pb2.FindMissingBlobsRequest(
            instance_name=self.instance, digest_function=_fn(fn),
            blob_digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in digests],
        )
        response = self._call(self.cas.FindMissingBlobs, request, "FindMissingBlobs")
        return [Digest(m.hash, m.size_bytes, fn) for m in response.missing_blob_digests]

    # -- uploads -------------------------------------------------------------------

    def upload(self, blobs: dict[Digest, Source], progress: Progress | None = None) -> None:
        """Upload every blob given (callers pass only what find_missing reported)."""
        limit = self.batch_limit
        small = [(d, s) for d, s in blobs.items() if d.size + BLOB_OVERHEAD <= limit // 2]
        large = [(d, s) for d, s in blobs.items() if d.size + BLOB_OVERHEAD > limit // 2]
        jobs = [self._pool.submit(self._batch_upload, batch, progress) for batch in _batches(small, limit)]
        jobs += [self._pool.submit(self._stream_upload, d, s, progress) for d, s in large]
        for job in jobs:
            job.result()

    def _batch_upload(self, batch: list[tuple[Digest, Source]], progress: Progress | None) -> None:
        fn = batch[0][0].function
        blobs = []
        for digest, source in batch:
            if isinstance(source, bytes):
                blobs.append((digest, source))
            else:
                with open(source, "rb", buffering=0) as f:
                    blobs.append((digest, f.readall()))
        request = encode_batch_update(self.instance, _fn(fn), blobs)
        response = self._call(self._batch_update_raw, request, "BatchUpdateBlobs")
        if len(response.responses) != len(batch):
            raise from_status(grpc.StatusCode.INTERNAL, f"BatchUpdateBlobs on {self.spec.url} answered "
                              f"{len(response.responses)} of {len(batch)} blobs")
        for r in response.responses:
            if r.status.code != code_pb2.OK:
                raise from_status(code_from_int(r.status.code), f"upload of {r.digest.hash}/{r.digest.size_bytes}: "
                                  f"{r.status.message}")
        nbytes = sum(d.size for d, _ in batch)
        self.uploaded.add(len(batch), nbytes)
        if progress:
            progress(len(batch), nbytes)

    def _stream_upload(self, digest: Digest, source: Source, progress: Progress | None) -> None:
        """ByteStream.Write, resuming from the server's committed_size after a transient failure."""
        resource = f"{_prefix(self.instance)}uploads/{uuid.uuid4()}/blobs/{_fn_path(digest)}{digest.hash}/{digest.size}"
        offset = 0
        attempt = 0
        while True:
            try:
                response = self.bytestream.Write(self._write_requests(resource, source, offset, digest),
                                                 metadata=self.metadata)
                if response.committed_size not in (digest.size, -1):
                    raise DigestMismatch(f"server committed {response.committed_size} of {digest.size} bytes")
                break
            except grpc.RpcError as exc:
                if exc.code() not in TRANSIENT or attempt >= self.policy.retries:
                    raise from_status(exc.code(), f"upload of {digest}: {exc.details()}") from None
                attempt += 1
                committed = self._committed(resource)
                if committed is None:  # the server forgot the upload: start a new one
                    resource = (f"{_prefix(self.instance)}uploads/{uuid.uuid4()}/blobs/{_fn_path(digest)}"
                                f"{digest.hash}/{digest.size}")
                    committed = 0
                offset = committed
                log.info("upload of %s interrupted (%s); resuming at %d", digest, exc.code().name, offset)
                self.policy_sleep(attempt)
        self.uploaded.add(1, digest.size)
        if progress:
            progress(1, digest.size)

    def policy_sleep(self, attempt: int) -> None:
        import time

        time.sleep(self.policy.delay(attempt))

    def _committed(self, resource: str) -> int | None:
        """Where to resume an interrupted upload; None when the server does not know it."""
        try:
            status = self.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=resource),
                                                      metadata=self.metadata, timeout=self.policy.request_timeout)
            return status.committed_size
        except grpc.RpcError:
            return None

    def _write_requests(self, resource: str, source: Source, offset: int, digest: Digest) -> Iterator:
        chunks = _chunks(source, offset)
        position = offset
        pending = next(chunks, b"")
        first = True
        for chunk in chunks:
            yield bs_pb2.WriteRequest(resource_name=resource if first else "", write_offset=position, data=pending)
            position += len(pending)
            pending = chunk
            first = False
        yield bs_pb2.WriteRequest(resource_name=resource if first else "", write_offset=position, data=pending,
                                  finish_write=True)

    def upload_bytes(self, data: bytes, function: DigestFunction = DigestFunction.SHA256) -> Digest:
        digest = Digest.of(data, function)
        if self.find_missing([digest]):
            self.upload({digest: data})
        return digest

    # -- downloads -----------------------------------------------------------------

    def download(self, digests: Iterable[Digest], sink: Callable[[Digest, Iterator[bytes]], None],
                 progress: Progress | None = None) -> None:
        """Fetch blobs; `sink(digest, chunks)` stores each (from worker threads).

        Content is verified before it reaches the sink's last chunk: a corrupt
        download raises DigestMismatch.  A missing blob raises BlobNotFound.
        """
        limit = self.batch_limit
        wanted = list(dict.fromkeys(digests))
        small = [d for d in wanted if d.size + BLOB_OVERHEAD <= limit // 2]
        large = [d for d in wanted if d.size + BLOB_OVERHEAD > limit // 2]
        jobs = [self._pool.submit(self._batch_download, [d for d, _ in batch], sink, progress)
                for batch in _batches([(d, b"") for d in small], limit)]
        jobs += [self._pool.submit(self._stream_download, d, sink, progress) for d in large]
        for job in jobs:
            job.result()

    def _batch_download(self, digests: list[Digest], sink: Callable, progress: Progress | None) -> None:
        fn = digests[0].function
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance, digest_function=_fn(fn),
            digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in digests],
        )
        response = self._call(self.cas.BatchReadBlobs, request, "BatchReadBlobs")
        answered = {(r.digest.hash, r.digest.size_bytes) for r in response.responses}
        unanswered = [d for d in digests if (d.hash, d.size) not in answered]
        if unanswered:
            raise from_status(grpc.StatusCode.INTERNAL, f"BatchReadBlobs on {self.spec.url} left out "
                              f"{len(unanswered)} of {len(digests)} blobs, e.g. {unanswered[0]}")
        for r in response.responses:
            digest = Digest(r.digest.hash, r.digest.size_bytes, fn)
            if r.status.code == code_pb2.NOT_FOUND:
                raise BlobNotFound(digest, f"not on {self.spec.url}")
            if r.status.code != code_pb2.OK:
                raise from_status(code_from_int(r.status.code), f"download of {digest}: {r.status.message}")
            verifier = Verifier(digest)
            verifier.update(r.data)
            verifier.finish()
            sink(digest, iter((r.data,)))
        nbytes = sum(d.size for d in digests)
        self.downloaded.add(len(digests), nbytes)
        if progress:
            progress(len(digests), nbytes)

    def _stream_download(self, digest: Digest, sink: Callable, progress: Progress | None) -> None:
        sink(digest, self.read_stream(digest))
        self.downloaded.add(1, digest.size)
        if progress:
            progress(1, digest.size)

    def read_stream(self, digest: Digest) -> Iterator[bytes]:
        """ByteStream.Read, verified, resuming at the delivered offset after a transient failure."""
        resource = f"{_prefix(self.instance)}blobs/{_fn_path(digest)}{digest.hash}/{digest.size}"
        verifier = Verifier(digest)
        attempt = 0
        while True:
            try:
                for response in self.bytestream.Read(
                    bs_pb2.ReadRequest(resource_name=resource, read_offset=verifier.received), metadata=self.metadata
                ):
                    if response.data:
                        verifier.update(response.data)
                        attempt = 0
                        yield response.data
                break
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise BlobNotFound(digest, f"not on {self.spec.url}") from None
                if exc.code() not in TRANSIENT or attempt >= self.policy.retries:
                    raise from_status(exc.code(), f"download of {digest}: {exc.details()}") from None
                attempt += 1
                self.policy_sleep(attempt)
        verifier.finish()

    def read_bytes(self, digest: Digest) -> bytes:
        return b"".join(self.read_stream(digest))

    # -- trees ---------------------------------------------------------------------

    def get_tree(self, root: Digest) -> dict[Digest, bytes]:
        """Every Directory of a tree, serialized, by digest (GetTree; a BFS of batch reads
        for servers without it)."""
        fn = root.function
        directories: dict[Digest, bytes] = {}
        try:
            token = ""
            while True:
                request = re_pb2.GetTreeRequest(instance_name=self.instance, digest_function=_fn(fn),
                                                root_digest=re_pb2.Digest(hash=root.hash, size_bytes=root.size),
                                                page_token=token)
                token = ""
                for page in self.policy.call_sync(
                    lambda r=request: list(self.cas.GetTree(r, metadata=self.metadata)), "GetTree"
                ):
                    for directory in page.directories:
                        data = directory.SerializeToString(deterministic=True)
                        directories[Digest.of(data, fn)] = data
                    token = page.next_page_token
                if not token:
                    break
        except Unsupported:
            return self._walk_tree(root)
        except NotFound:
            raise BlobNotFound(root, f"tree root not on {self.spec.url}") from None
        if root.size and not _closed(root, directories):
            # A server may serialize differently from us (then our hashes of its messages
            # name nothing), or leave out a subtree it lacks: fetch the exact bytes instead,
            # which names a missing directory precisely.
            return self._walk_tree(root)
        return directories

    def _walk_tree(self, root: Digest) -> dict[Digest, bytes]:
        directories: dict[Digest, bytes] = {}
        level = [root]
        while level:
            found: dict[Digest, bytes] = {}
            wanted = [d for d in level if d.size]
            self.download(wanted, lambda d, chunks, out=found: out.__setitem__(d, b"".join(chunks)))
            next_level = []
            for digest in level:
                data = found.get(digest, b"")
                directories[digest] = data
                for node in re_pb2.Directory.FromString(data).directories:
                    child = Digest(node.digest.hash, node.digest.size_bytes, root.function)
                    if child not in directories:
                        next_level.append(child)
            level = list(dict.fromkeys(next_level))
        return directories

    # -- names ---------------------------------------------------------------------

    def fetch_directory(self, uris: list[str], qualifiers: dict[str, str] | None = None,
                        function: DigestFunction = DigestFunction.SHA256) -> Digest:
        return self._fetch(self.fetch.FetchDirectory, ra_pb2.FetchDirectoryRequest, "root_directory_digest",
                           uris, qualifiers, function)

    def fetch_blob(self, uris: list[str], qualifiers: dict[str, str] | None = None,
                   function: DigestFunction = DigestFunction.SHA256) -> Digest:
        return self._fetch(self.fetch.FetchBlob, ra_pb2.FetchBlobRequest, "blob_digest", uris, qualifiers, function)

    def _fetch(self, method, request_cls: type, field: str, uris: list[str],
               qualifiers: dict[str, str] | None, function: DigestFunction) -> Digest:
        """A Remote Asset fetch: the digest; `AssetNotFound` on a miss, however the server reports it
        (an RPC NOT_FOUND or a response status)."""
        request = request_cls(
            instance_name=self.instance, uris=uris, digest_function=_fn(function),
            qualifiers=[ra_pb2.Qualifier(name=n, value=v) for n, v in (qualifiers or {}).items()],
        )
        try:
            response = self._call(method, request, request_cls.__name__.removesuffix("Request"))
        except NotFound as exc:
            raise AssetNotFound(f"{uris[0]}: {exc}") from None
        if response.status.code == code_pb2.NOT_FOUND:
            raise AssetNotFound(f"{uris[0]}: {response.status.message or 'not found'}")
        if response.status.code != code_pb2.OK:  # e.g. PERMISSION_DENIED: say so, not "miss"
            raise from_status(code_from_int(response.status.code), f"{uris[0]}: {response.status.message}")
        d = getattr(response, field)
        return Digest(d.hash, d.size_bytes, function)

    def push_directory(self, uris: list[str], root: Digest, qualifiers: dict[str, str] | None = None) -> None:
        request = ra_pb2.PushDirectoryRequest(
            instance_name=self.instance, uris=uris, digest_function=_fn(root.function),
            root_directory_digest=re_pb2.Digest(hash=root.hash, size_bytes=root.size),
            qualifiers=[ra_pb2.Qualifier(name=n, value=v) for n, v in (qualifiers or {}).items()],
        )
        self._call(self.push.PushDirectory, request, "PushDirectory")

    def push_blob(self, uris: list[str], blob: Digest, qualifiers: dict[str, str] | None = None) -> None:
        request = ra_pb2.PushBlobRequest(
            instance_name=self.instance, uris=uris, digest_function=_fn(blob.function),
            blob_digest=re_pb2.Digest(hash=blob.hash, size_bytes=blob.size),
            qualifiers=[ra_pb2.Qualifier(name=n, value=v) for n, v in (qualifiers or {}).items()],
        )
        self._call(self.push.PushBlob, request, "PushBlob")

    def get_reference(self, key: str) -> Digest:
        """The tree a BuildStream reference names; `AssetNotFound` when the server has none."""
        try:
            response = self._call(self.references.GetReference,
                                  bst_pb2.GetReferenceRequest(instance_name=self.instance, key=key), "GetReference")
        except NotFound as exc:
            raise AssetNotFound(f"reference {key!r}: {exc}") from None
        return Digest(response.digest.hash, response.digest.size_bytes)

    def update_reference(self, keys: list[str], root: Digest) -> None:
        request = bst_pb2.UpdateReferenceRequest(
            instance_name=self.instance, keys=keys, digest=re_pb2.Digest(hash=root.hash, size_bytes=root.size)
        )
        self._call(self.references.UpdateReference, request, "UpdateReference")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_batch_update(instance: str, digest_function: int, blobs: list[tuple[Digest, bytes]]) -> bytes:
    """A `BatchUpdateBlobsRequest` in protobuf wire form, built with one join.

    Building the message and serializing it copies every blob twice more (into the
    message, then into the serialized bytes), and each fresh multi-MiB buffer costs
    page faults: that was a third of the client's CPU in a push.  The encoding is
    the canonical one (fields in number order, defaults omitted): instance_name = 1,
    requests = 2 (Request: digest = 1 {hash = 1, size_bytes = 2}, data = 2),
    digest_function = 5.
    """
    parts: list[bytes] = []
    if instance:
        name = instance.encode()
        parts += (b"\x0a", _varint(len(name)), name)
    for digest, data in blobs:
        body = b"\x0a" + _varint(len(digest.hash)) + digest.hash.encode()
        if digest.size:
            body += b"\x10" + _varint(digest.size)
        digest_field = b"\x0a" + _varint(len(body)) + body
        data_field = (b"\x12" + _varint(len(data))) if data else b""
        parts += (b"\x12", _varint(len(digest_field) + len(data_field) + len(data)), digest_field, data_field, data)
    if digest_function:
        parts += (b"\x28", _varint(digest_function))
    return b"".join(parts)


def _closed(root: Digest, directories: dict[Digest, bytes]) -> bool:
    """Whether `directories` holds the root and every subdirectory any of them names."""
    if root not in directories:
        return False
    for data in directories.values():
        for node in re_pb2.Directory.FromString(data).directories:
            if node.digest.size_bytes and Digest(node.digest.hash, node.digest.size_bytes, root.function) \
                    not in directories:
                return False
    return True


def _fn(function: DigestFunction) -> int:
    return function.proto_value


def _fn_path(digest: Digest) -> str:
    return "blake3/" if digest.function is DigestFunction.BLAKE3 else ""


def _prefix(instance: str) -> str:
    return f"{instance}/" if instance else ""


def _batches(items: list[tuple[Digest, Source]], limit: int) -> list[list[tuple[Digest, Source]]]:
    batches: list[list[tuple[Digest, Source]]] = []
    total = 0
    for item in items:
        size = item[0].size + BLOB_OVERHEAD
        if not batches or total + size > limit:
            batches.append([])
            total = 0
        batches[-1].append(item)
        total += size
    return batches


def _chunks(source: Source, offset: int) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for i in range(offset, len(source), CHUNK_SIZE):
            yield source[i : i + CHUNK_SIZE]
        return
    with open(source, "rb", buffering=0) as f:
        f.seek(offset)
        while chunk := f.read(CHUNK_SIZE):
            yield chunk


def read_file_chunks(path: str | os.PathLike) -> Iterator[bytes]:
    return _chunks(Path(path), 0)
