"""An asyncio connection to a REAPI server: channel, stubs, retries, capabilities.

Shared by everything that talks to a server (the CAS client and through it the
`remote` storage backend, the remote ActionCache, the remote asset index, the
CLI's sync facade), so one upstream is one channel with one retry policy and one
set of credentials.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field, replace

import grpc

from casbah.cdc import DEFAULT_AVG, FastCdcParams
from casbah.digest import Digest
from casbah.errors import CasbahError, Unsupported
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.reapi import plan
from casbah.reapi.channel import MAX_MESSAGE, RemoteSpec, open_aio_channel
from casbah.reapi.retry import RetryPolicy

log = logging.getLogger(__name__)

SAFE_BATCH_SIZE = plan.SAFE_BATCH_SIZE
#: Seconds before a failed capabilities probe is tried again.
CAPABILITIES_RETRY = 30.0


@dataclass
class RemoteCapabilities:
    max_batch_size: int = SAFE_BATCH_SIZE
    zstd: bool = False
    digest_functions: frozenset[int] = field(default_factory=frozenset)
    #: SplitBlob / SpliceBlob, and the FastCDC 2020 parameters chunks are cut with
    #: (None when the server advertises none, or ones outside the REAPI's range).
    split: bool = False
    splice: bool = False
    cdc: FastCdcParams | None = None


class AsyncRemote:
    """One upstream.  Channels are created lazily, inside the running event loop."""

    def __init__(self, spec: RemoteSpec, policy: RetryPolicy | None = None, channel_options: list | None = None,
                 max_message: int = MAX_MESSAGE) -> None:
        self.spec = spec
        self.policy = policy or RetryPolicy()
        self.channel_options = channel_options or []
        self.max_message = max_message
        self._metadata = spec.metadata()
        self._token_mtime = _mtime(spec.token_file)
        self._channel: grpc.aio.Channel | None = None
        self._caps: RemoteCapabilities | None = None
        self._caps_lock: asyncio.Lock | None = None
        self._caps_retry_at: float | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata (the bearer token).  The token file is read again when it changes,
        so a long-running proxy follows a rotated token without a restart."""
        mtime = _mtime(self.spec.token_file)
        if mtime is not None and mtime != self._token_mtime:
            try:
                self._metadata = self.spec.metadata()
                self._token_mtime = mtime
            except OSError as exc:
                log.warning("%s: cannot read token file %s: %s", self.describe(), self.spec.token_file, exc)
        return self._metadata

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = open_aio_channel(self.spec, [*self.reconnect_options(), *self.channel_options])
            self.cas = re_grpc.ContentAddressableStorageStub(self._channel)
            self.bytestream = bs_grpc.ByteStreamStub(self._channel)
            self.action_cache = re_grpc.ActionCacheStub(self._channel)
            self.capabilities_stub = re_grpc.CapabilitiesStub(self._channel)
            self.fetch = ra_grpc.FetchStub(self._channel)
            self.push = ra_grpc.PushStub(self._channel)
            self.references = bst_grpc.ReferenceStorageStub(self._channel)
        return self._channel

    def reconnect_options(self) -> list[tuple[str, int]]:
        """gRPC backs off reconnecting for up to 2 minutes after a refused connection, and
        fails calls at once meanwhile: an upstream back after a restart would then see
        every retry of ours fail.  Cap its backoff at ours."""
        cap_ms = int(min(max(self.policy.max_backoff, 0.1), 10.0) * 1000)
        return [
            ("grpc.initial_reconnect_backoff_ms", min(100, cap_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, cap_ms)),
            ("grpc.max_reconnect_backoff_ms", cap_ms),
        ]

    def stubs(self) -> AsyncRemote:
        _ = self.channel
        return self

    @property
    def instance(self) -> str:
        return self.spec.instance

    def describe(self) -> str:
        return f"{self.spec.url}" + (f" instance {self.spec.instance!r}" if self.spec.instance else "")

    async def unary(self, method, request, what: str, idempotent: bool = True):
        """One unary call with the policy's retries and per-call timeout."""
        return await self.policy.call(
            lambda: method(request, metadata=self.metadata, timeout=self.policy.request_timeout),
            f"{what} on {self.describe()}", idempotent,
        )

    async def capabilities(self) -> RemoteCapabilities:
        """The remote's limits, probed once.  When the probe fails (the remote is down)
        the safe defaults are used and the probe is tried again after a while, so an
        upstream that starts after us still gets its real limits and zstd used."""
        loop = asyncio.get_running_loop()
        if self._caps is not None and (self._caps_retry_at is None or loop.time() < self._caps_retry_at):
            return self._caps
        if self._caps_lock is None:
            self._caps_lock = asyncio.Lock()
        async with self._caps_lock:
            if self._caps is None or (self._caps_retry_at is not None and loop.time() >= self._caps_retry_at):
                caps, ok = await self._probe()
                self._caps = caps
                self._caps_retry_at = None if ok else loop.time() + CAPABILITIES_RETRY
        return self._caps

    async def _probe(self) -> tuple[RemoteCapabilities, bool]:
        stubs = self.stubs()
        caps = RemoteCapabilities()
        request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance)
        once = replace(self.policy, retries=0)  # a failed probe falls back at once; the real call retries
        try:
            response = await once.call(
                lambda: stubs.capabilities_stub.GetCapabilities(request, metadata=self.metadata,
                                                                timeout=self.policy.request_timeout),
                f"GetCapabilities on {self.describe()}",
            )
        except Unsupported:
            log.info("%s has no Capabilities service; using a %d-byte batch limit", self.describe(), SAFE_BATCH_SIZE)
            return caps, True
        except CasbahError as exc:
            log.warning("%s: no capabilities (%s); using a %d-byte batch limit for now", self.describe(), exc,
                        SAFE_BATCH_SIZE)
            return caps, False
        cache = response.cache_capabilities
        caps.max_batch_size = plan.batch_limit(cache.max_batch_total_size_bytes, self.max_message)
        caps.zstd = re_pb2.Compressor.ZSTD in cache.supported_compressors
        caps.digest_functions = frozenset(cache.digest_functions)
        caps.split, caps.splice, caps.cdc = cache.split_blob_support, cache.splice_blob_support, _cdc(cache)
        log.info("%s: batch limit %d bytes, zstd %s", self.describe(), caps.max_batch_size, caps.zstd)
        return caps, True

    def blob_path(self, digest: Digest, compressed: bool = False) -> str:
        return plan.blob_resource(self.instance, digest, compressed)

    def upload_path(self, upload_id: str, digest: Digest, compressed: bool = False) -> str:
        return plan.upload_resource(self.instance, upload_id, digest, compressed)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _cdc(cache: re_pb2.CacheCapabilities) -> FastCdcParams | None:
    """The advertised FastCDC parameters; outside the REAPI's range the client ignores
    chunking (the REAPI says so), unset means its default (512 KiB, seed 0)."""
    if not (cache.split_blob_support or cache.splice_blob_support):
        return None
    params = cache.fast_cdc_2020_params
    try:
        return FastCdcParams(params.avg_chunk_size_bytes or DEFAULT_AVG, params.seed)
    except ValueError as exc:
        log.warning("ignoring the server's content-defined chunking: %s", exc)
        return None


def _mtime(path: str | None) -> int | None:
    if not path:
        return None
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
