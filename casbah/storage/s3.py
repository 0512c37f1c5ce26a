"""`s3`: one object per blob in an S3-protocol store (AWS S3, MinIO, Ceph RGW, GCS interop).

Verification before visibility, without a copy: a blob up to `multipart-threshold`
is buffered (bounded), hashed, then PUT; a larger one is sent as a multipart
upload whose parts are hashed as they go, and the upload is *completed* only if
the whole stream matched its digest, *aborted* otherwise.  An incomplete
multipart upload is never visible as an object, so a mismatch or a crash leaves
nothing readable (configure the bucket's lifecycle rule
`AbortIncompleteMultipartUpload` to reclaim abandoned parts).  The cost is the
5 MiB minimum part size S3 imposes: memory per large upload is one part.

Reads are GETs streamed in chunks, each chunk hashed in the thread hop that read
it (unless `verify: false`): the bucket holds bytes casbah did not necessarily
write (anyone with the bucket's keys, a lifecycle tool, a bad disk), so a blob
that fails its digest is DataLoss and its last chunk is never passed on.  A
ranged read GETs the whole object to verify it and passes on the range; without
verification it is a ranged GET.  FindMissingBlobs is concurrent HEADs
(put an `existence-cache` in front, or the PostgreSQL `blob-index`); nothing on
the hot path lists the bucket, so lifecycle expiry works as an eviction policy
(not behind a `blob-index`'s back: docs/deployment.md, "Expiry").
boto3 is synchronous: every call runs in a thread, one per chunk or per blob,
and costs ~1.5 ms of CPU (signing, parsing), which is what a FindMissingBlobs of
many absent digests pays per digest without a blob index.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import boto3
import botocore.config
import botocore.exceptions
from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest
from casbah.errors import BlobNotFound, CasbahError, DataLoss, Unavailable
from casbah.storage.base import (
    CHUNK_SIZE,
    BlobInfo,
    Storage,
    Verifier,
    check_range,
    found_or_lost,
    verified_range,
)
from casbah.storage.loader import NodeOptions, register
from casbah.streams import empty_stream

log = logging.getLogger(__name__)

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class S3Storage(Storage):
    kind = "s3"

    def __init__(self, *, bucket: str, prefix: str = "cas/", endpoint: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None, threshold: int = 8 << 20,
                 part_size: int = 8 << 20, parallelism: int = 32, create_bucket: bool = False,
                 checksums: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bucket = bucket
        self.prefix = prefix
        self.threshold = threshold
        self.part_size = max(part_size, 5 << 20)
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                        region_name=region)
        # boto3 >= 1.36 adds CRC32 checksum headers to every upload by default, which many
        # S3-compatible stores (MinIO before 2025, Ceph RGW, GCS interop, B2, R2) reject or
        # mis-sign; casbah verifies SHA-256 itself before any PUT, so they are opt-in.
        when: Literal["when_supported", "when_required"] = "when_supported" if checksums else "when_required"
        self.client = session.client(
            "s3", endpoint_url=endpoint,
            config=botocore.config.Config(max_pool_connections=parallelism, retries={"max_attempts": 3,
                                                                                    "mode": "standard"},
                                          request_checksum_calculation=when, response_checksum_validation=when),
        )
        self._pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="casbah-s3")
        self.endpoint = endpoint or "aws"
        # Checked on first use, not here: a stateless server must start (and answer
        # UNAVAILABLE) while the store is down, and N workers must not race at startup.
        self._bucket_ready = not create_bucket
        self._bucket_lock = asyncio.Lock()
        self._flights: dict[str, asyncio.Future[bool]] = {}

    def describe(self) -> str:
        return f"s3({self.endpoint}/{self.bucket}/{self.prefix})"

    def _ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") not in _NOT_FOUND | {"NoSuchBucket"}:
                raise
        try:
            self.client.create_bucket(Bucket=self.bucket)
            log.info("created bucket %s on %s", self.bucket, self.endpoint)
        except botocore.exceptions.ClientError as exc:  # another server or worker was first
            if exc.response.get("Error", {}).get("Code", "") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    async def _ready(self) -> None:
        if self._bucket_ready:
            return
        async with self._bucket_lock:
            if not self._bucket_ready:
                await self._call(self._ensure_bucket)
                self._bucket_ready = True

    def _key(self, digest: Digest) -> str:
        return f"{self.prefix}{digest.key}"

    async def _run(self, fn, *args, **kwargs):
        """Run a boto3 call in the pool (creating the bucket first if asked to),
        turning store and transport failures into Unavailable; a 404 stays a ClientError."""
        await self._ready()
        return await self._call(fn, *args, **kwargs)

    async def _call(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _NOT_FOUND:
                raise
            raise Unavailable(f"{self.describe()} refused the request: {code}: {exc}") from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise Unavailable(f"{self.describe()} is unavailable: {exc}") from None

    async def _exists(self, digest: Digest) -> bool:
        try:
            await self._run(self.client.head_object, Bucket=self.bucket, Key=self._key(digest))
            return True
        except botocore.exceptions.ClientError:
            return False

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        present = await asyncio.gather(*(self._exists(d) for d in digests))
        return [d for d, ok in zip(digests, present, strict=True) if not ok]

    async def has(self, digest: Digest) -> bool:
        return await self._exists(digest)

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        count = check_range(digest, digest.size, offset, limit)
        if count == 0:
            if not await self._exists(digest):
                raise BlobNotFound(digest)
            return empty_stream()
        get = {"Bucket": self.bucket, "Key": self._key(digest)}
        if not self.verify:
            get["Range"] = f"bytes={offset}-{offset + count - 1}"
        try:
            response = await self._run(self.client.get_object, **get)
        except botocore.exceptions.ClientError:
            raise BlobNotFound(digest, f"not in {self.describe()}") from None
        if not self.verify:
            return self._body(response["Body"], None)
        verifier = self.read_verifier(digest)
        return verified_range(self._body(response["Body"], verifier), verifier, offset, count, hashed=True)

    async def _body(self, body, verifier: Verifier | None) -> AsyncIterator[bytes]:
        def next_chunk() -> bytes:
            chunk = body.read(CHUNK_SIZE)
            if verifier is not None and chunk:
                verifier.update(chunk)  # here, in the thread that read it: hashlib releases the GIL
            return chunk

        try:
            while chunk := await self._run(next_chunk):
                yield chunk
        finally:
            body.close()

    async def read_bytes(self, digest: Digest) -> bytes:
        """A whole (small) blob in one thread hop: GET and body read together."""
        if digest.size == 0:
            return b"".join([c async for c in await self.read(digest)])

        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            self.check_read(digest, data)  # still in the thread
            return data

        try:
            return await self._run(get)
        except botocore.exceptions.ClientError:
            raise BlobNotFound(digest, f"not in {self.describe()}") from None

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        async def one(d: Digest) -> tuple[Digest, bytes | DataLoss | None]:
            try:
                return d, await self.read_bytes(d)
            except BlobNotFound:
                return d, None
            except DataLoss as exc:
                return d, exc

        found: dict[Digest, bytes] = {}
        lost: dict[Digest, CasbahError] = {}
        for d, data in await asyncio.gather(*(one(d) for d in digests)):
            if isinstance(data, DataLoss):
                lost[d] = data
            elif data is not None:
                found[d] = data
        return found_or_lost(found, lost)

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        verifier = self.verifier(digest)
        if digest.size <= self.threshold:
            parts = []
            async for chunk in chunks:
                verifier.update(chunk)
                parts.append(chunk)
            verifier.finish()
            body = b"".join(parts)
            await self._once(self._key(digest), lambda: self._run(self.client.put_object, Bucket=self.bucket,
                                                                   Key=self._key(digest), Body=body))
            return
        key = self._key(digest)
        upload = await self._run(self.client.create_multipart_upload, Bucket=self.bucket, Key=key)
        upload_id = upload["UploadId"]
        etags: list[dict] = []
        try:
            buffered: list[bytes] = []
            pending = 0
            async for chunk in chunks:
                verifier.update(chunk)
                buffered.append(chunk)
                pending += len(chunk)
                if pending >= self.part_size:
                    await self._part(key, upload_id, etags, b"".join(buffered))
                    buffered, pending = [], 0
            verifier.finish()
            if buffered or not etags:
                await self._part(key, upload_id, etags, b"".join(buffered))
            completed = await self._once(key, lambda: self._run(
                self.client.complete_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": etags}))
            if not completed:  # a concurrent writer stored the same blob meanwhile: ours is redundant
                await self._abort(digest, key, upload_id)
        except BaseException:
            await self._abort(digest, key, upload_id)
            raise

    async def _abort(self, digest: Digest, key: str, upload_id: str) -> None:
        try:
            await self._run(self.client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id)
        except CasbahError as exc:
            log.warning("could not abort multipart upload of %s: %s", digest, exc)

    async def _once(self, key: str, store) -> bool:
        """Run `store()` (the call that makes `key` visible) unless a writer of the same
        key in this process is doing so right now: then wait for it, and return False
        if it succeeded (the blob is there; same digest, so the same verified bytes),
        or take over if it failed.  Concurrent identical uploads are common (several
        clients building the same thing), and they need not all reach the store."""
        while (flight := self._flights.get(key)) is not None:
            if await asyncio.shield(flight):
                return False
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        ok = False
        try:
            await store()
            ok = True
        finally:
            del self._flights[key]
            flight.set_result(ok)
        return True

    async def _part(self, key: str, upload_id: str, etags: list[dict], data: bytes) -> None:
        number = len(etags) + 1
        response = await self._run(self.client.upload_part, Bucket=self.bucket, Key=key, UploadId=upload_id,
                                   PartNumber=number, Body=data)
        etags.append({"PartNumber": number, "ETag": response["ETag"]})

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        async def one(digest: Digest, data: bytes) -> Exception | None:
            try:
                await self.write_bytes(digest, data)
                return None
            except CasbahError as exc:
                return exc

        return list(await asyncio.gather(*(one(d, data) for d, data in blobs)))

    async def delete(self, digests: Sequence[Digest]) -> int:
        absent = set(await self.find_missing(digests))
        present = [d for d in digests if d not in absent]
        for start in range(0, len(present), 1000):
            batch = present[start : start + 1000]
            await self._run(self.client.delete_objects, Bucket=self.bucket,
                            Delete={"Objects": [{"Key": self._key(d)} for d in batch], "Quiet": True})
        return len(present)

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        """Lists the bucket: for GC and scrubbing, never for requests."""
        from casbah.storage.keys import parse_key

        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._run(self.client.list_objects_v2, **kwargs)
            for obj in page.get("Contents", []):
                digest = parse_key(obj["Key"][len(self.prefix):])
                if digest is not None:
                    yield BlobInfo(digest, obj["Size"], obj["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    async def close(self) -> None:
        self._pool.shutdown(wait=False)


class S3Options(NodeOptions):
    bucket: str
    prefix: str = "cas/"
    endpoint: str | None = Field(default=None, description="e.g. http://127.0.0.1:9000 for MinIO; unset for AWS")
    region: str | None = None
    access_key: str | None = Field(default=None, alias="access-key", description="default: the AWS chain")
    secret_key: str | None = Field(default=None, alias="secret-key")
    multipart_threshold: int | str = Field(default="8M", alias="multipart-threshold")
    part_size: int | str = Field(default="8M", alias="part-size")
    parallelism: int = Field(default=32, gt=0)
    create_bucket: bool = Field(default=False, alias="create-bucket")
    checksums: bool = Field(default=False, description="CRC32 request checksums and response validation "
                                                       "(AWS supports them; many S3-compatible stores do not)")


@register("s3", S3Options)
def _build(options: S3Options, loader: object, path: str) -> S3Storage:
    return S3Storage(
        bucket=options.bucket, prefix=options.prefix, endpoint=options.endpoint, region=options.region,
        access_key=options.access_key, secret_key=options.secret_key,
        threshold=parse_size(options.multipart_threshold), part_size=parse_size(options.part_size),
        parallelism=options.parallelism, create_bucket=options.create_bucket, checksums=options.checksums,
        verify=options.verify, name=path,
    )
