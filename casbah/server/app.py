"""Assembles a grpc.aio server from a `ServerConfig` and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from casbah import humanize
from casbah.assets.index import IndexContext, build_asset_index
from casbah.cdc import FastCdcParams
from casbah.config import ConfigError, InstanceConfig, ListenerConfig, ServerConfig
from casbah.digest import DigestFunction
from casbah.errors import StartupError
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.protos.casbah.admin.v1 import admin_pb2_grpc as admin_grpc
from casbah.server import allocator
from casbah.server.action_cache import ActionCacheService
from casbah.server.admin import AdminService
from casbah.server.admission import Admission
from casbah.server.asset import AssetSettings, FetchService, PushService
from casbah.server.auth import Authorizer
from casbah.server.base import Instance, Instances, MalformedRequests
from casbah.server.binding import check_bind, check_tls
from casbah.server.bytestream import ByteStreamService
from casbah.server.capabilities import CapabilitiesService
from casbah.server.cas import CasService
from casbah.server.exposure import warn_if_exposed
from casbah.server.http import Endpoints
from casbah.server.interceptor import MetricsInterceptor
from casbah.server.observability import Observability
from casbah.server.references import ReferenceStorageService
from casbah.server.upkeep import Reloader, TlsFiles, cancel, purge_assets
from casbah.server.wire import add_bytestream_servicer, add_cas_servicer
from casbah.storage.action_cache import build_action_cache
from casbah.storage.base import Storage
from casbah.storage.loader import StorageLoader, load_builtin_kinds
from casbah.storage.spliced import SplicedStorage

if TYPE_CHECKING:
    from casbah.assets.origin import OriginFetcher
    from casbah.http.server import HttpFront

log = logging.getLogger("casbah.server")


@dataclass
class Server:
    config: ServerConfig
    instances: Instances
    grpc_server: grpc.aio.Server
    ports: list[str] = field(default_factory=list)
    closers: list = field(default_factory=list)
    observability: Observability | None = None
    #: gRPC health/reflection and the HTTP side (/metrics, /healthz, status page).
    endpoints: Endpoints | None = None
    #: The TLS listeners' files, reloadable (casbah.server.upkeep).
    tls: list[TlsFiles] = field(default_factory=list)
    http: HttpFront | None = None  # the HTTP cache front (`http-listen`), on this event loop

    def reloader(self) -> Reloader:
        return Reloader(self.instances.authorizer, self.config.auth.tokens, self.tls, self.config.reload_interval)

    async def stop(self, grace: float | None = None) -> None:
        if self.endpoints is not None:
            await self.endpoints.enter_shutdown()  # health NOT_SERVING while draining
        if self.http is not None:
            await self.http.stop()  # finishes requests in flight, then closes
        await self.grpc_server.stop(self.config.grace_seconds if grace is None else grace)
        for close in self.closers:
            await close()


def build_instances(
    config: ServerConfig, maintenance: bool = False, shared_directories: bool = False
) -> tuple[Instances, StorageLoader]:
    """`maintenance`: opened by an admin command beside a live server (disk storage then
    leaves the server's in-progress uploads alone).  `shared_directories`: this process
    is one of `serve --workers N` (see `StorageLoader`)."""
    load_builtin_kinds()
    loader = StorageLoader(config.storages, maintenance=maintenance, shared_directories=shared_directories)
    instances: dict[str, Instance] = {}
    for name, inst in config.instances.items():
        where = f"instances.{name!r}"
        cas = SplicedStorage(loader.build(inst.storage, f"{where}.storage"),
                             _split_index(loader, inst.split_index or "splits", f"{where}.split-index"))
        action_cache = build_action_cache(loader, inst.action_cache or "action-cache", f"{where}.action-cache")
        instances[name] = Instance(
            name=name, cas=cas, action_cache=action_cache, services=frozenset(inst.services),
            read_only=inst.read_only,
            digest_functions=tuple(DigestFunction(f) for f in inst.digest_functions),
            chunking=FastCdcParams(int(inst.chunking.avg_chunk_size), inst.chunking.seed)
            if inst.chunking.enabled else None,
            spool_dir=Path(config.data_dir) / "split-tmp",
            extras={"check_action_results": inst.check_action_results,
                    "asset": _asset_settings(config, name, inst, where, cas)},
        )
    per_instance = {name: inst.anonymous for name, inst in config.instances.items() if inst.anonymous}
    authorizer = Authorizer(config.auth, per_instance)
    return Instances(instances, config.max_batch_size, config.max_message_size, authorizer, config.limits), loader


def _split_index(loader: StorageLoader, node: str | dict, path: str) -> Storage:
    index = loader.build(node, path)
    if index.verify:
        raise ConfigError(f"{path}: storage {index.name!r} verifies hashes; a split index needs 'verify: false'")
    return index


def _origin_tmp(root: Path) -> Path:
    """This process's scratch area for origin downloads; leftovers of dead processes go."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.isdigit() and not _alive(int(entry.name)):
            shutil.rmtree(entry, ignore_errors=True)
    return root / str(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _asset_settings(config: ServerConfig, name: str, inst: InstanceConfig, where: str,
                    cas: Storage) -> AssetSettings:
    index = build_asset_index(inst.asset_index, IndexContext(name, Path(config.data_dir), f"{where}.asset-index"))
    origin: OriginFetcher | None = None
    if inst.origin_fetch is not None:
        from casbah.assets.origin import DEFAULT_MAX_SIZE, OriginFetcher  # only with origin fetch (startup time)

        max_size = inst.origin_fetch.max_size
        if max_size is None:
            quota = store_quota(cas)
            max_size = min(DEFAULT_MAX_SIZE, quota) if quota else DEFAULT_MAX_SIZE
        origin = OriginFetcher(inst.origin_fetch.allow, _origin_tmp(Path(config.data_dir) / "origin-tmp"),
                               inst.origin_fetch.git, int(max_size))
    return AssetSettings(index=index, origin=origin, miss=inst.asset_miss)


def store_quota(node: Storage) -> int | None:
    """The byte quota a blob written to `node` must fit in, when every store it may land in
    has one (disk, memory); None when unknown or unbounded.  A node with its own quota
    decides; else the largest of its children's (a cache or router writes to one of them)."""
    own = getattr(node, "max_bytes", None)
    if isinstance(own, int) and own > 0:
        return own
    children = list(node.children())
    if not children:
        return None
    quotas = [store_quota(child) for child in children]
    return None if any(q is None for q in quotas) else max(q for q in quotas if q is not None)


async def create_server(config: ServerConfig, reuse_port: bool = False, worker: int | None = None) -> Server:
    """`worker`: this process's number among `serve --workers N` (None: the only server)."""
    instances, loader = build_instances(config, shared_directories=worker is not None)
    limits = config.limits
    options = [
        ("grpc.max_receive_message_length", config.max_message_size),
        ("grpc.max_send_message_length", config.max_message_size),
        # grpcio turns SO_REUSEPORT on by default, which lets a second server bind the
        # same port silently and steal half the connections: a port in use must fail.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        # Calls gRPC has taken off the wire but the Python server not yet picked up: above
        # 1,000 gRPC cancels some at random (CANCELLED), above 3,000 all.  A burst must be
        # picked up and then wait in casbah's admission instead; the queue bounds it there.
        ("grpc.server.max_pending_requests", limits.max_concurrent_rpcs + limits.max_queued_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", limits.max_concurrent_rpcs + limits.max_queued_rpcs),
        ("grpc.max_connection_idle_ms", int(limits.connection_idle * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    from casbah import __version__

    observability = Observability(instances, version=__version__)
    endpoints = Endpoints(observability, instances.authorizer)
    # No `maximum_concurrent_rpcs`: gRPC refuses the calls over it, where casbah's admission
    # makes them wait (casbah.server.admission).
    admission = Admission(limits.max_concurrent_rpcs, limits.max_queued_rpcs)
    server = grpc.aio.server(options=options,
                             interceptors=[MalformedRequests(), MetricsInterceptor(observability, admission)])
    bytestream = ByteStreamService(instances)
    re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(instances), server)
    add_cas_servicer(CasService(instances), server)  # BatchReadBlobs answers pre-encoded bytes
    re_grpc.add_ActionCacheServicer_to_server(ActionCacheService(instances), server)
    add_bytestream_servicer(bytestream, server)  # Read answers pre-encoded bytes
    fetch = FetchService(instances)
    ra_grpc.add_FetchServicer_to_server(fetch, server)
    ra_grpc.add_PushServicer_to_server(PushService(instances, fetch.trees), server)
    bst_grpc.add_ReferenceStorageServicer_to_server(ReferenceStorageService(instances, fetch.trees), server)
    admin_grpc.add_AdminServicer_to_server(AdminService(instances), server)
    await endpoints.add_health_and_reflection(server)
    result = Server(config, instances, server, observability=observability, endpoints=endpoints)
    for listener in config.listeners():
        result.ports.append(_listen(server, listener, result.tls, reuse_port))
    observability.listen = list(result.ports)
    if config.http_listen:
        from casbah.http.server import HttpFront  # aiohttp: only with an HTTP front (startup time)

        result.http = HttpFront(config, instances, loader)  # builds the opaque stores: before closers
    result.closers.insert(0, endpoints.close)  # the status page reads storage: stop it first
    result.closers.append(bytestream.close)
    for storage in loader.all():
        result.closers.append(storage.close)
    for instance in instances:
        result.closers.append(instance.extras["asset"].index.close)
        # A storage-backed ActionCache closes its storage again: closing a storage node is idempotent.
        result.closers.append(instance.action_cache.close)
    return result


def _remove_stale_socket(path: str) -> None:
    """A socket file nobody answers on is a leftover of a crash; one that answers is in use."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise StartupError(f"cannot listen on unix:{path}: another server is listening there")


def _listen(server: grpc.aio.Server, listener: ListenerConfig, tls: list[TlsFiles], reuse_port: bool = False) -> str:
    """Bind one listener; returns the address as served (port 0 resolved)."""
    address = listener.address
    if address.startswith("unix:"):
        path = address.removeprefix("unix:").removeprefix("//")
        if os.path.exists(path):
            _remove_stale_socket(path)
    if listener.tls_cert or listener.tls_key:
        if not (listener.tls_cert and listener.tls_key):
            raise StartupError(f"{address}: TLS needs both a certificate and a key")
        check_tls(listener.tls_cert, listener.tls_key, listener.tls_client_ca)
    check_bind(address, reuse_port)
    try:
        if listener.tls_cert and listener.tls_key:
            files = TlsFiles(listener.tls_cert, listener.tls_key, listener.tls_client_ca)
            port = server.add_secure_port(address, files.credentials())
            tls.append(files)
        else:
            if listener.tls_client_ca:
                raise StartupError(f"{address}: a client CA (mTLS) needs a TLS certificate and key too")
            port = server.add_insecure_port(address)
    except OSError as exc:
        raise StartupError(f"{address}: cannot read TLS material: {exc}") from None
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    if port == 0 and not address.startswith("unix:"):
        raise StartupError(f"cannot listen on {address}: grpc refused the address")
    if address.startswith("unix:"):
        if listener.unix_mode:
            os.chmod(address.removeprefix("unix:").removeprefix("//"), int(listener.unix_mode, 8))
        return address
    scheme = "grpcs" if listener.tls_cert else "grpc"
    shown = address if not address.endswith(":0") else f"{address[:-2]}:{port}"
    return f"{scheme}://{shown}"


async def serve(config: ServerConfig, reuse_port: bool = False, worker: int | None = None) -> None:
    allocator.tune()  # each worker process: before any MiB-sized buffer is allocated
    server = await create_server(config, reuse_port, worker)
    _warn_quota(config)
    metrics_url = None
    if config.metrics_listen and server.endpoints is not None:
        try:  # before gRPC starts: a bad metrics address must fail startup, not half of it
            metrics_url = await server.endpoints.start_http(config.metrics_listen, worker)
        except (OSError, ValueError) as exc:
            await server.stop(0)
            raise StartupError(str(exc)) from None
    http_url = None
    if config.http_listen and server.http is not None:
        try:
            http_url = await server.http.start(config.http_listen, reuse_port)
        except (OSError, ValueError) as exc:
            await server.stop(0)
            raise StartupError(f"cannot serve HTTP on {config.http_listen}: {exc}") from None
    await server.grpc_server.start()
    for instance in server.instances:
        quota = store_quota(instance.cas)
        log.info(
            "instance %r: storage %s (quota %s), services %s%s", instance.name, instance.cas.describe(),
            humanize.size(quota) if quota else "none", ",".join(sorted(instance.services)),
            " (read-only)" if instance.read_only else "",
        )
    if not worker:  # once, not once per worker
        http = [ListenerConfig(address=config.http_listen, tls_client_ca=config.tls_client_ca)] \
            if config.http_listen else []  # the HTTP front takes the same callers
        warn_if_exposed(config.listeners() + http, server.instances)
    who = "casbah" if worker is None else f"casbah worker {worker}"
    for address in server.ports:
        print(f"{who}: serving REAPI on {address} (instances: "
              f"{', '.join(repr(n) for n in server.instances.names())})", flush=True)
    if http_url:
        print(f"{who}: serving the HTTP cache protocol on {http_url}", flush=True)
    if metrics_url:
        print(f"{who}: metrics on {metrics_url}/metrics, status page on {metrics_url}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = server.reloader()
    loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
    background = [loop.create_task(reloader.watch()),
                  loop.create_task(purge_assets(list(server.instances), config.asset_purge_interval))]
    await stop.wait()
    for task in background:
        await cancel(task)
    log.info("shutting down: draining in-flight requests for up to %.0fs", config.grace_seconds)
    await server.stop()
    print("casbah: stopped", flush=True)


def _warn_quota(config: ServerConfig) -> None:
    data = Path(config.data_dir)
    try:
        free = shutil.disk_usage(data if data.exists() else data.parent).free
    except OSError:
        return
    if config.quota and free < config.quota:
        log.warning("quota %s exceeds free space on %s (%s): eviction will not save the disk",
                    humanize.size(config.quota), data, humanize.size(free))
