"""ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree, and SplitBlob /
SpliceBlob (content-defined chunking: storage/spliced.py and storage/splitting.py, docs/chunking.md)."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Sequence
from itertools import repeat
from operator import add, attrgetter, itemgetter

import grpc
from google.rpc import status_pb2

from casbah import compression
from casbah.cdc import FastCdcParams
from casbah.digest import INFERABLE_LENGTHS, Digest, DigestFunction, is_empty_blob, make_digest
from casbah.digest_batch import DigestArray
from casbah.errors import (
    InvalidArgument,
    InvalidTree,
    NotFound,
    Unsupported,
    code_from_int,
    code_to_int,
    echo,
    from_os_error,
    is_no_space,
    status_code,
)
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.server.audit import note_write_outcome
from casbah.server.auth import digest_list
from casbah.server.base import Instances, bounded, no_space, rpc, rpc_stream
from casbah.server.wire import FindMissingRequest, encode_batch_read, encode_missing
from casbah.storage.base import Storage, read_many_partial
from casbah.storage.spliced import CHUNKING_UNKNOWN, FAST_CDC_2020, REP_MAX_CDC, SplicedStorage
from casbah.storage.splitting import splice, split
from casbah.tree import Visit, walk_levels
from casbah.tree_rules import served

log = logging.getLogger("casbah.server")
_ZSTD = re_pb2.Compressor.ZSTD
_IDENTITY = re_pb2.Compressor.IDENTITY
OK = status_pb2.Status()
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000


def digests_from(messages: Sequence, function: DigestFunction) -> list[Digest]:
    """Validated digests, built fast: FindMissingBlobs turns a thousand a call.

    Validation runs over all hashes at once in C (`bytes.fromhex` accepts exactly
    hex digit pairs, plus whitespace and upper case, which the other checks
    exclude); only a failing request pays the per-digest path that names the culprit.
    """
    pairs = list(map(_HASH_SIZE, messages))  # one pass over the messages (each access builds a wrapper)
    n = len(pairs)
    hashes, sizes = zip(*pairs, strict=True) if pairs else ((), ())
    width = function.hex_length
    joined = "".join(hashes)
    try:
        ok = (len(joined) == width * n and len(bytes.fromhex(joined)) * 2 == width * n and joined == joined.lower()
              and (not n or (min(map(len, hashes)) == width and min(sizes) >= 0)))
    except ValueError:
        ok = False
    if not ok:
        for h, size in pairs:
            make_digest(h, size, function)  # raises, naming the culprit
    return list(map(tuple.__new__, repeat(Digest, n), map(add, pairs, repeat((function,), n))))


_HASH_SIZE = attrgetter("hash", "size_bytes")
_SIZE_OF = itemgetter(1)


def _first_hash(messages: Sequence) -> str | None:
    """What an unset `digest_function` is inferred from: all digests of a request
    share one function, so the first hash of a usable length decides (the rest must
    match it; a malformed one fails alone where the call reports per blob)."""
    return next((m.hash for m in messages if len(m.hash) in INFERABLE_LENGTHS), None)


def _missing_response(missing: Sequence[Digest]) -> re_pb2.FindMissingBlobsResponse:
    response = re_pb2.FindMissingBlobsResponse()
    add = response.missing_blob_digests.add  # half the cost of building Digest messages first
    for d in missing:
        add(hash=d.hash, size_bytes=d.size)
    return response


def error_status(exc: BaseException) -> status_pb2.Status:
    if is_no_space(exc):  # a store that did not say which it was: at least say it is CAS
        exc = from_os_error(exc, "CAS storage")
    code = status_code(exc)
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):  # a bug: the operator needs the trace
        log.error("a blob of a batch failed with an unexpected error: %r", exc, exc_info=exc)
    return status_pb2.Status(code=code_to_int(code), message=bounded(str(exc)))


def _batch_outcome(statuses: list) -> str:
    """`OK`, or how many blobs got each status (`OK 3, RESOURCE_EXHAUSTED 2`), for the audit line."""
    counts: dict[str, int] = {}
    for s in statuses:
        name = code_from_int(s.code).name
        counts[name] = counts.get(name, 0) + 1
    if set(counts) <= {"OK"}:
        return "OK"
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))


class CasService(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, instances: Instances) -> None:
        self.instances = instances

    def _instance(self, name: str, context, what: str, write: bool = False, detail: str = ""):
        return self.instances.get(name, "cas", context, write=write, what=what, detail=detail)

    @rpc
    async def FindMissingBlobs(self, request, context):
        instance = self._instance(request.instance_name, context, "FindMissingBlobs")
        cas = instance.cas
        if isinstance(request, FindMissingRequest):  # parsed from its bytes (server/wire.py)
            function = instance.digest_function(request.digest_function, request.first_hash)
            array = request.digests(function)
            if array is not None:
                missing = await cas.find_missing(array)
                if isinstance(missing, DigestArray):
                    return request.respond(missing)
                digests: Sequence[Digest] = array.items()  # a backend that built a list of them
                return encode_missing(request, digests, missing) or _missing_response(missing)
            request = request.parsed()
        function = instance.digest_function(request.digest_function, _first_hash(request.blob_digests))
        digests = digests_from(request.blob_digests, function)
        wanted = digests if not digests or min(map(_SIZE_OF, digests)) else [
            d for d in digests if d.size or not is_empty_blob(d)]
        missing = await cas.find_missing(wanted) if wanted else []
        return encode_missing(request, digests, missing) or _missing_response(missing)

    def _check_batch_size(self, total: int, what: str) -> None:
        limit = self.instances.max_batch_size
        if total > limit:
            raise InvalidArgument(
                f"{what} totals {total} bytes, over max_batch_total_size_bytes {limit}: use ByteStream"
            )

    @rpc
    async def BatchUpdateBlobs(self, request, context):
        detail = digest_list([r.digest for r in request.requests])
        instance = self._instance(request.instance_name, context, "BatchUpdateBlobs", write=True, detail=detail)
        instance.check_writable("BatchUpdateBlobs")
        function = instance.digest_function(request.digest_function,
                                            _first_hash([r.digest for r in request.requests]))
        self._check_batch_size(sum(len(r.data) for r in request.requests), "BatchUpdateBlobs request")
        # Compressed blobs are expanded in memory, up to the size their digests claim:
        # bound the total a client can make the server allocate for one request.
        expanded = sum(r.digest.size_bytes for r in request.requests if r.compressor != _IDENTITY)
        cap = max(self.instances.max_message_size, 16 * self.instances.max_batch_size)
        if expanded > cap:
            raise InvalidArgument(
                f"BatchUpdateBlobs request names {expanded} bytes of blobs, over the {cap} a batch may expand to: "
                "use ByteStream"
            )
        held = sum(len(r.data) for r in request.requests) + expanded
        self.instances.uploads.acquire(held, "BatchUpdateBlobs")
        try:
            return await self._batch_update(instance, request, function)
        finally:
            self.instances.uploads.release(held)

    async def _batch_update(self, instance, request, function: DigestFunction):
        statuses: list[status_pb2.Status | None] = []
        todo: list[tuple[Digest, bytes]] = []
        slots: list[int] = []
        for r in request.requests:
            try:
                digest = make_digest(r.digest.hash, r.digest.size_bytes, function)
                data = r.data
                if r.compressor == _ZSTD:
                    data = compression.decompress(data, digest.size)
                elif r.compressor != _IDENTITY:
                    raise InvalidArgument(f"compressor {r.compressor} is not supported in batches (zstd is)")
            except Exception as exc:
                statuses.append(error_status(exc))
                continue
            if is_empty_blob(digest) and not data:
                statuses.append(OK)
                continue
            slots.append(len(statuses))
            statuses.append(None)
            todo.append((digest, data))
        if todo:
            results = await instance.cas.write_many(todo)
            full = None
            for slot, error in zip(slots, results, strict=True):
                status = statuses[slot] = OK if error is None else error_status(error)
                if error is not None and full is None and no_space(error):
                    full = status.message
            if full is not None:  # one line per batch, however many blobs did not fit
                log.warning("BatchUpdateBlobs: RESOURCE_EXHAUSTED: %s", full)
        note_write_outcome(_batch_outcome(statuses))
        return re_pb2.BatchUpdateBlobsResponse(
            responses=[
                re_pb2.BatchUpdateBlobsResponse.Response(digest=r.digest, status=s)
                for r, s in zip(request.requests, statuses, strict=True)
            ]
        )

    @rpc
    async def BatchReadBlobs(self, request, context):
        instance = self._instance(request.instance_name, context, "BatchReadBlobs")
        cas = instance.cas
        function = instance.digest_function(request.digest_function, _first_hash(request.digests))
        digests = digests_from(request.digests, function)
        self._check_batch_size(sum(d.size for d in digests), "BatchReadBlobs request")
        stored = [d for d in digests if not is_empty_blob(d)]
        # Blobs that failed verification (an upstream or a store that lies) answer
        # DATA_LOSS alone; the others of the batch are served.
        found, lost = await read_many_partial(cas, stored) if stored else ({}, {})
        if len(stored) < len(digests):  # the empty blob is served whether stored or not
            found = {**found, **{d: b"" for d in digests if is_empty_blob(d)}}
        packed: dict[Digest, bytes] = {}
        if _ZSTD in request.acceptable_compressors:
            for digest, data in found.items():
                if len(data) >= 256 and len(smaller := compression.compress(data)) < len(data):
                    packed[digest] = smaller
        statuses = {digest: error_status(error) for digest, error in lost.items()} if lost else {}
        return encode_batch_read(digests, found, statuses, packed)

    @rpc_stream
    async def GetTree(self, request, context) -> AsyncIterator:
        instance = self._instance(request.instance_name, context, "GetTree")
        cas = instance.cas
        root = instance.digest(request.root_digest, request.digest_function)
        if request.page_size < 0:
            raise InvalidArgument(f"page_size {request.page_size} is negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        skip = _parse_page_token(request.page_token, root)
        budget = min(self.instances.max_message_size, 4 << 20) - (64 << 10)
        position = 0
        page: list = []
        page_bytes = 0
        async for visit in _present(cas, root):
            position += 1
            if position <= skip:
                continue
            if page and (len(page) >= page_size or page_bytes + visit.size > budget):
                yield re_pb2.GetTreeResponse(
                    directories=page, next_page_token=_page_token(root, position - 1)
                )
                page, page_bytes = [], 0
            page.append(visit.directory)
            page_bytes += visit.size + 8
        yield re_pb2.GetTreeResponse(directories=page, next_page_token="")

    @rpc
    async def SplitBlob(self, request, context):
        instance = self._instance(request.instance_name, context, "SplitBlob")
        blob = instance.digest(request.blob_digest, request.digest_function)
        params = _chunking(instance)
        chunks, chunking = await split(_spliced(instance), blob, params, instance.spool_dir)
        return re_pb2.SplitBlobResponse(
            chunk_digests=[re_pb2.Digest(hash=c.hash, size_bytes=c.size) for c in chunks],
            chunking_function=re_pb2.ChunkingFunction.Value.Name(chunking),  # the stored wire number, by its enum name
        )

    @rpc
    async def SpliceBlob(self, request, context):
        detail = digest_list([request.blob_digest])
        instance = self._instance(request.instance_name, context, "SpliceBlob", write=True, detail=detail)
        instance.check_writable("SpliceBlob")
        _chunking(instance)
        blob = instance.digest(request.blob_digest, request.digest_function)
        chunks = digests_from(request.chunk_digests, blob.function)
        if request.chunking_function not in (CHUNKING_UNKNOWN, FAST_CDC_2020, REP_MAX_CDC):
            raise InvalidArgument(f"chunking_function {request.chunking_function} is not a ChunkingFunction value")
        await splice(_spliced(instance), blob, chunks, request.chunking_function)
        return re_pb2.SpliceBlobResponse(blob_digest=request.blob_digest)


def _chunking(instance) -> FastCdcParams:
    if instance.chunking is None:
        raise Unsupported(f"content-defined chunking is off on instance {instance.name!r} "
                          "(split_blob_support and splice_blob_support are false)")
    return instance.chunking


def _spliced(instance) -> SplicedStorage:
    """Every instance's CAS is a SplicedStorage (server/app.py builds it so)."""
    if not isinstance(instance.cas, SplicedStorage):
        raise Unsupported(f"instance {instance.name!r} keeps no split records")
    return instance.cas


async def _present(cas: Storage, root: Digest) -> AsyncIterator[Visit]:
    """The tree's Directory messages for GetTree: missing subtrees are skipped (REAPI),
    only a missing root is NOT_FOUND.

    The walk checks each level before it is handed over, so a stored tree with a bad
    name is never served: the stream ends with FAILED_PRECONDITION naming the entry
    (see docs/architecture.md), before any Directory of that level is sent.
    """
    try:
        async for visits in walk_levels(cas.read_many, [(root, "")]):
            if visits[0].digest == root and visits[0].directory is None:
                raise NotFound(f"root directory {root} not found")
            for visit in visits:
                if visit.directory is not None:
                    yield visit
    except InvalidTree as exc:
        raise served(exc) from None


def _page_token(root: Digest, position: int) -> str:
    return base64.urlsafe_b64encode(f"1:{root.hash}:{position}".encode()).decode()


def _parse_page_token(token: str, root: Digest) -> int:
    if not token:
        return 0
    try:
        version, root_hash, position = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if version != "1" or root_hash != root.hash or not position.isdigit():
            raise ValueError
        return int(position)
    except ValueError:
        raise InvalidArgument(f"page_token {echo(token)} was not issued for this tree") from None
