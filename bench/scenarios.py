"""The benchmark scenarios: a plain registry of name -> function(Context) -> ScenarioResult.

A scenario owns its setup (uploading what it later reads) so any subset can run alone,
runs its timed phase `ctx.repeats(default)` times, and returns every repeat's figures;
the runner reports medians.  Uploads in timed phases always use data the server has
never seen (a fresh dataset seed per repeat), because re-uploading present blobs
measures a server's shortcut, not its write path.

To add a scenario (e.g. a casbah-only extra), write a function and add it to SCENARIOS;
add it to CORE_SCENARIOS too only if every default run should pay for it.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc

from bench.client_tree import client_tree
from bench.common import (
    BenchError,
    Dataset,
    VerificationError,
    batches_by_size,
    make_channel,
    re_grpc,
    re_pb2,
    rpc_error,
    slice_indices,
)
from bench.context import Context, Metric, MiB, ScenarioResult
from bench.http_cache import http_cache
from bench.jobs import (
    BatchReadJob,
    BatchUpdateJob,
    BigReadJob,
    BigWriteJob,
    FindMissingJob,
    FmbPlan,
    GetTreeJob,
    MixJob,
    SmallReadJob,
    SmallWriteJob,
)
from bench.loadgen import Job, PhaseResult, percentile
from bench.targets import BackgroundProbe, server_cpu_seconds, start_target, stop_target


def _cpu_per(result: PhaseResult, ops: int) -> float | None:
    return None if result.server_cpu is None or ops == 0 else result.server_cpu / ops


# --------------------------------------------------------------------------- scenarios


def fmb(ctx: Context) -> ScenarioResult:
    """FindMissingBlobs of 100k digests, 1,000 a request, 20% present, from several processes."""
    total = ctx.scaled(100_000, minimum=1000)
    present = Dataset(ctx.new_seed("fmb-present"), total // 5, 64, 256)
    ctx.upload(present, f"{present.count} present blobs")
    settle = _settle(ctx, present)
    plan = FmbPlan(present, ctx.new_seed("fmb-missing"), total - present.count, 1000)
    rates, p50s, cpu = [], [], []
    for _ in range(ctx.repeats(3)):
        jobs: list[Job] = [
            FindMissingJob(ctx.address, ctx.instance, plan, p, ctx.processes) for p in range(ctx.processes)
        ]
        result = ctx.phase(jobs, "FindMissingBlobs")
        if result.ops != total or result.counter("missing") != plan.missing:
            raise VerificationError(f"FindMissingBlobs: checked {result.ops} digests, expected {total}")
        rates.append(result.ops_per_s)
        p50s.append(percentile(result.latencies(), 50) * 1000)
        cpu.append(_cpu_per(result, result.ops))
    return ScenarioResult(
        [Metric("FindMissingBlobs", "digests/s", rates)],
        {"digests": total, "present": present.count, "per_request": 1000, "settle_s": settle, "request_p50_ms": p50s,
         "server_cpu_s_per_digest": cpu},
    )


def _settle(ctx: Context, dataset: Dataset, probes: int = 8, timeout: float = 10.0) -> float:
    """Untimed: seconds until FindMissingBlobs on `probes` fresh connections reports none of
    `dataset` missing.  0 for a server that is consistent at once; a server whose processes
    share uploads asynchronously (`casbah serve --workers N` on disk: a journal replayed
    every 0.5 s) is measured once it has settled, and its lag is recorded as `settle_s`."""
    digests = [d for d, _ in dataset.blobs(range(dataset.count))]
    start = time.monotonic()
    rounds = 0
    while True:
        rounds += 1
        lagging = 0
        for _ in range(probes):
            with make_channel(ctx.address) as channel:
                stub = re_grpc.ContentAddressableStorageStub(channel)
                for i in range(0, len(digests), 1000):
                    request = re_pb2.FindMissingBlobsRequest(instance_name=ctx.instance,
                                                             blob_digests=digests[i : i + 1000])
                    try:
                        lagging += len(stub.FindMissingBlobs(request, timeout=60).missing_blob_digests)
                    except grpc.RpcError as err:
                        raise rpc_error("FindMissingBlobs (settle check)", err) from None
        waited = time.monotonic() - start
        if not lagging:
            return 0.0 if rounds == 1 else round(waited, 2)
        if waited > timeout:
            raise VerificationError(f"FindMissingBlobs: {lagging} uploaded digests still reported missing "
                                    f"{waited:.1f}s after their upload")
        time.sleep(0.1)


def _batch_jobs(ctx: Context, cls: type, dataset: Dataset) -> list[Job]:
    parts = min(ctx.processes, dataset.count)
    return [
        cls(ctx.address, ctx.instance, dataset, r.start, r.stop, ctx.batch_limit)
        for r in (slice_indices(dataset.count, parts, p) for p in range(parts))
    ]


def batch_update(ctx: Context) -> ScenarioResult:
    """BatchUpdateBlobs of 20k fresh 1-8 KiB random blobs, batches of up to the batch limit."""
    count = ctx.scaled(20_000, minimum=100)
    rates, mbs, cpu = [], [], []
    for r in range(ctx.repeats(3)):
        dataset = Dataset(ctx.new_seed(f"batch-update-{r}"), count, 1024, 8192)
        result = ctx.phase(_batch_jobs(ctx, BatchUpdateJob, dataset), "BatchUpdateBlobs")
        if result.ops != count:
            raise VerificationError(f"BatchUpdateBlobs: {result.ops} blobs confirmed, {count} sent")
        rates.append(result.ops_per_s)
        mbs.append(result.bytes_per_s / 1e6)
        cpu.append(_cpu_per(result, result.ops))
    return ScenarioResult(
        [Metric("BatchUpdateBlobs", "blobs/s", rates), Metric("BatchUpdateBlobs", "MB/s", mbs)],
        {"blobs": count, "batch_limit": ctx.batch_limit, "server_cpu_s_per_blob": cpu},
    )


def batch_read(ctx: Context) -> ScenarioResult:
    """BatchReadBlobs of 20k 1-8 KiB blobs (uploaded first), every byte compared."""
    count = ctx.scaled(20_000, minimum=100)
    dataset = Dataset(ctx.new_seed("batch-read"), count, 1024, 8192)
    ctx.upload(dataset, f"{count} blobs")
    rates, mbs, cpu = [], [], []
    for _ in range(ctx.repeats(3)):
        result = ctx.phase(_batch_jobs(ctx, BatchReadJob, dataset), "BatchReadBlobs")
        if result.ops != count:
            raise VerificationError(f"BatchReadBlobs: {result.ops} blobs verified, {count} asked")
        rates.append(result.ops_per_s)
        mbs.append(result.bytes_per_s / 1e6)
        cpu.append(_cpu_per(result, result.ops))
    return ScenarioResult(
        [Metric("BatchReadBlobs", "blobs/s", rates), Metric("BatchReadBlobs", "MB/s", mbs)],
        {"blobs": count, "batch_limit": ctx.batch_limit, "server_cpu_s_per_blob": cpu},
    )


def _big_size(ctx: Context) -> int:
    return ctx.scaled(256 * MiB, minimum=MiB)


def bytestream_write(ctx: Context) -> ScenarioResult:
    """ByteStream.Write of a fresh 256 MiB blob in 1 MiB chunks, one stream."""
    size = _big_size(ctx)
    variant0 = ctx.new_seed("bs-write") & 0xFFFFFFFF
    rates, cpu = [], []
    for r in range(ctx.repeats(3)):
        result = ctx.phase([BigWriteJob(ctx.address, ctx.instance, size, variant0 + r, MiB)], "ByteStream.Write")
        rates.append(result.bytes_per_s / 1e6)
        cpu.append(_cpu_per(result, result.bytes // MiB))
    return ScenarioResult([Metric("ByteStream write", "MB/s", rates)],
                          {"blob_bytes": size, "chunk": MiB, "server_cpu_s_per_MiB": cpu})


def bytestream_read(ctx: Context) -> ScenarioResult:
    """ByteStream.Read of 256 MiB blobs (two distinct ones, uploaded first), every byte compared."""
    size = _big_size(ctx)
    variant0 = ctx.new_seed("bs-read") & 0xFFFFFFFF
    for v in range(2):
        ctx.phase([BigWriteJob(ctx.address, ctx.instance, size, variant0 + v, MiB)], "setup: ByteStream.Write")
    rates, cpu = [], []
    for r in range(ctx.repeats(3)):
        result = ctx.phase([BigReadJob(ctx.address, ctx.instance, size, variant0 + r % 2)], "ByteStream.Read")
        rates.append(result.bytes_per_s / 1e6)
        cpu.append(_cpu_per(result, result.bytes // MiB))
    return ScenarioResult([Metric("ByteStream read", "MB/s", rates)],
                          {"blob_bytes": size, "server_cpu_s_per_MiB": cpu})


def bytestream_small(ctx: Context) -> ScenarioResult:
    """5,000 fresh 1-64 KiB blobs, each written by its own ByteStream.Write (16 KiB chunks)
    and read by its own ByteStream.Read, from 4 processes: Bazel 4's upload pattern."""
    count = ctx.scaled(5000, minimum=100)
    parts = min(ctx.processes, count)
    writes, reads, cpu_w, cpu_r, p50_w, p50_r = [], [], [], [], [], []
    for r in range(ctx.repeats(2)):
        dataset = Dataset(ctx.new_seed(f"bs-small-{r}"), count, 1024, 64 * 1024)
        slices = [slice_indices(count, parts, p) for p in range(parts)]
        w = ctx.phase([SmallWriteJob(ctx.address, ctx.instance, dataset, s.start, s.stop, 16 * 1024)
                       for s in slices], "ByteStream.Write small")
        rd = ctx.phase([SmallReadJob(ctx.address, ctx.instance, dataset, s.start, s.stop) for s in slices],
                       "ByteStream.Read small")
        if w.ops != count or rd.ops != count:
            raise VerificationError(f"ByteStream small: {w.ops} writes / {rd.ops} reads done, {count} expected")
        writes.append(w.ops_per_s)
        reads.append(rd.ops_per_s)
        p50_w.append(percentile(w.latencies(), 50) * 1000)
        p50_r.append(percentile(rd.latencies(), 50) * 1000)
        cpu_w.append(_cpu_per(w, w.ops))
        cpu_r.append(_cpu_per(rd, rd.ops))
    return ScenarioResult(
        [Metric("ByteStream small write", "writes/s", writes), Metric("ByteStream small read", "reads/s", reads)],
        {"blobs": count, "chunk": 16 * 1024, "processes": parts, "write_p50_ms": p50_w, "read_p50_ms": p50_r,
         "server_cpu_s_per_write": cpu_w, "server_cpu_s_per_read": cpu_r},
    )


def _upload_direct(ctx: Context, blobs: list[tuple[re_pb2.Digest, bytes]]) -> None:
    """Upload a few blobs from the parent (e.g. Directory messages), checking each status."""
    with make_channel(ctx.address) as channel:
        stub = re_grpc.ContentAddressableStorageStub(channel)
        for batch in batches_by_size(blobs, ctx.batch_limit):
            request = re_pb2.BatchUpdateBlobsRequest(instance_name=ctx.instance)
            for digest, data in batch:
                request.requests.add(digest=digest, data=data)
            try:
                response = stub.BatchUpdateBlobs(request, timeout=120)
            except grpc.RpcError as err:
                raise rpc_error(f"BatchUpdateBlobs ({len(batch)} blobs)", err) from None
            bad = [r for r in response.responses if r.status.code != 0]
            if bad or len(response.responses) != len(batch):
                raise VerificationError(f"BatchUpdateBlobs: {len(bad)} blobs failed, "
                                        f"{len(response.responses)}/{len(batch)} answered")


def _digest_of(message: Any) -> tuple[re_pb2.Digest, bytes]:
    """A message's canonical bytes and their digest (deterministic serialization: field
    order, no unknown fields, as REAPI requires for hashed messages)."""
    blob = message.SerializeToString(deterministic=True)
    return re_pb2.Digest(hash=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob)), blob


def gettree(ctx: Context) -> ScenarioResult:
    """GetTree of a 10k-file tree (100 directories x 100 files under one root), page_size 1000,
    up to 50 trees a repeat."""
    per_dir = 100
    n_dirs = max(1, ctx.scaled(10_000) // per_dir)
    files = Dataset(ctx.new_seed("gettree-files"), n_dirs * per_dir, 64, 512)
    ctx.upload(files, f"{files.count} file blobs")
    file_digests = [d for d, _ in files.blobs(range(files.count))]
    directories: list[tuple[re_pb2.Digest, bytes]] = []
    expected: dict[tuple[str, int], int] = {}
    root = re_pb2.Directory()
    for i in range(n_dirs):
        directory = re_pb2.Directory(files=[
            re_pb2.FileNode(name=f"f{j:03d}.o", digest=file_digests[i * per_dir + j], is_executable=j % 7 == 0)
            for j in range(per_dir)
        ])
        digest, blob = _digest_of(directory)
        directories.append((digest, blob))
        expected[(digest.hash, digest.size_bytes)] = per_dir
        root.directories.add(name=f"d{i:03d}", digest=digest)
    root_digest, root_blob = _digest_of(root)
    directories.append((root_digest, root_blob))
    expected[(root_digest.hash, root_digest.size_bytes)] = 0
    _upload_direct(ctx, directories)
    per_tree_ms, files_per_s, pages = [], [], 0
    for _ in range(ctx.repeats(3)):
        job = GetTreeJob(ctx.address, ctx.instance, (root_digest.hash, root_digest.size_bytes), expected,
                         page_size=1000, iterations=50, time_limit=10.0)
        result = ctx.phase([job], "GetTree")
        per_tree_ms.append(statistics.median(result.latencies()) * 1000)
        files_per_s.append(files.count * result.ops / result.wall)
        pages = result.counter("pages") // max(1, result.ops)
    return ScenarioResult(
        [Metric("GetTree", "files/s", files_per_s), Metric("GetTree", "ms/tree", per_tree_ms, False)],
        {"directories": len(directories), "files": files.count, "page_size": 1000, "pages_per_tree": pages},
    )


def concurrent(ctx: Context) -> ScenarioResult:
    """8 client processes each looping FindMissingBlobs(100) + BatchReadBlobs(10) for 10 s."""
    dataset = Dataset(ctx.new_seed("concurrent"), ctx.scaled(2000, minimum=50), 1024, 8192)
    ctx.upload(dataset, f"{dataset.count} blobs")
    duration = max(2.0, 10.0 * ctx.scale)
    rates, p50, p99, fmb_p50, read_p50, cpu = [], [], [], [], [], []
    for r in range(ctx.repeats(2)):
        jobs: list[Job] = [
            MixJob(ctx.address, ctx.instance, dataset, ctx.new_seed(f"concurrent-missing-{c}"), 100, 10,
                   duration, seed=ctx.new_seed(f"concurrent-{r}-{c}"))
            for c in range(ctx.clients)
        ]
        result = ctx.phase(jobs, "concurrent FindMissingBlobs+BatchReadBlobs", timeout=duration * 10 + 300)
        samples = result.latencies()
        rates.append(result.ops_per_s)
        p50.append(percentile(samples, 50) * 1000)
        p99.append(percentile(samples, 99) * 1000)
        fmb_p50.append(percentile(result.latencies("fmb"), 50) * 1000)
        read_p50.append(percentile(result.latencies("read"), 50) * 1000)
        cpu.append(_cpu_per(result, result.ops))
    return ScenarioResult(
        [
            Metric("concurrent mix", "ops/s", rates),
            Metric("concurrent mix p50", "ms", p50, higher_is_better=False),
            Metric("concurrent mix p99", "ms", p99, higher_is_better=False),
        ],
        {"clients": ctx.clients, "duration_s": duration, "fmb_p50_ms": fmb_p50, "read_p50_ms": read_p50,
         "server_cpu_s_per_op": cpu},
    )


#: The edge of the `proxy` scenario: a local disk store in front of the target (`cache` over
#: `remote`), as in examples/edge-cache.yaml.  No zstd: on loopback it only costs CPU.
PROXY_EDGE_CONFIG = """\
storages:
  upstream: {{kind: remote, url: "grpc://{address}", instance: "{instance}", compression: identity}}
  fast: {{kind: disk, path: "{fast}"}}
instances:
  "":
    storage: {{kind: cache, fast: fast, slow: upstream}}
    action-cache: {{kind: remote, url: "grpc://{address}", instance: "{instance}"}}
"""


def proxy(ctx: Context) -> ScenarioResult:
    """A casbah edge in front of the target: BatchReadBlobs (1-8 KiB blobs) and ByteStream.Read
    (a big blob) through the edge on a miss (fetched from the target and kept on the edge's
    disk) and on a hit, each against reading the target directly."""
    import shutil
    import tempfile
    from pathlib import Path

    work = Path(tempfile.mkdtemp(prefix="casbah-proxy-"))
    config = work / "edge.yaml"
    config.write_text(PROXY_EDGE_CONFIG.format(address=ctx.address, instance=ctx.instance, fast=work / "fast"))
    edge = start_target("casbah", work, casbah_args=["--config", str(config)], install=False)
    count = ctx.scaled(10_000, minimum=100)
    size = ctx.scaled(128 * MiB, minimum=MiB)
    variant0 = ctx.new_seed("proxy-big") & 0xFFFFFFFF
    names = ("direct", "edge miss", "edge hit")
    batch: dict[str, list[float]] = {n: [] for n in names}
    stream: dict[str, list[float]] = {n: [] for n in names}
    edge_cpu: list[float | None] = []
    try:
        for r in range(ctx.repeats(2)):
            dataset = Dataset(ctx.new_seed(f"proxy-{r}"), count, 1024, 8192)
            ctx.upload(dataset, f"{count} blobs to the target")
            ctx.phase([BigWriteJob(ctx.address, ctx.instance, size, variant0 + r, MiB)], "setup: ByteStream.Write")
            cpu0 = server_cpu_seconds(edge)
            for name, address, instance in (("direct", ctx.address, ctx.instance), ("edge miss", edge.address, ""),
                                            ("edge hit", edge.address, "")):
                parts = min(ctx.processes, count)
                jobs: list[Job] = [BatchReadJob(address, instance, dataset, s.start, s.stop, ctx.batch_limit)
                                   for s in (slice_indices(count, parts, p) for p in range(parts))]
                result = ctx.phase(jobs, f"BatchReadBlobs {name}")
                if result.ops != count:
                    raise VerificationError(f"BatchReadBlobs {name}: {result.ops} blobs verified, {count} asked")
                batch[name].append(result.ops_per_s)
                result = ctx.phase([BigReadJob(address, instance, size, variant0 + r)], f"ByteStream.Read {name}")
                stream[name].append(result.bytes_per_s / 1e6)
            cpu1 = server_cpu_seconds(edge)
            edge_cpu.append(None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2))
    finally:
        stop_target(edge)
        shutil.rmtree(work, ignore_errors=True)

    def ratio(values: dict[str, list[float]], name: str) -> list[float]:
        return [v / d for v, d in zip(values[name], values["direct"], strict=True)]

    return ScenarioResult(
        [
            Metric("proxy BatchRead direct", "blobs/s", batch["direct"]),
            Metric("proxy BatchRead edge miss", "blobs/s", batch["edge miss"]),
            Metric("proxy BatchRead edge hit", "blobs/s", batch["edge hit"]),
            Metric("proxy BatchRead miss/direct", "x", ratio(batch, "edge miss")),
            Metric("proxy BatchRead hit/direct", "x", ratio(batch, "edge hit")),
            Metric("proxy ByteStream direct", "MB/s", stream["direct"]),
            Metric("proxy ByteStream edge miss", "MB/s", stream["edge miss"]),
            Metric("proxy ByteStream edge hit", "MB/s", stream["edge hit"]),
            Metric("proxy ByteStream miss/direct", "x", ratio(stream, "edge miss")),
            Metric("proxy ByteStream hit/direct", "x", ratio(stream, "edge hit")),
        ],
        {"blobs": count, "big_blob_bytes": size, "edge": "cache(disk, remote(target)), no compression",
         "edge_cpu_s": edge_cpu},
    )


ScenarioFn = Callable[[Context], ScenarioResult]

SCENARIOS: dict[str, ScenarioFn] = {
    "fmb": fmb,
    "batch_update": batch_update,
    "batch_read": batch_read,
    "bytestream_write": bytestream_write,
    "bytestream_read": bytestream_read,
    "bytestream_small": bytestream_small,
    "gettree": gettree,
    "concurrent": concurrent,
    "proxy": proxy,
    "client_tree": client_tree,  # casbah's client vs BuildGrid's, same server (bench/client_tree.py)
    "http": http_cache,  # casbah's HTTP front vs its gRPC, same server (bench/http_cache.py)
}


#: What runs when no --scenarios is given: the server scenarios every target is compared
#: on, which take ~2-3 minutes a target on 2 cores.  Extras registered in SCENARIOS (longer,
#: or about one aspect of casbah) run when named, or with `--scenarios all`.
CORE_SCENARIOS: tuple[str, ...] = (
    "fmb",
    "batch_update",
    "batch_read",
    "bytestream_write",
    "bytestream_read",
    "bytestream_small",
    "gettree",
    "concurrent",
)


def run_scenario(name: str, ctx: Context) -> ScenarioResult:
    """Run one scenario by name, timing it and attaching the phases it ran."""
    if name not in SCENARIOS:
        raise BenchError(f"unknown scenario {name!r}")
    ctx.phases = []
    start = time.monotonic()
    probe = BackgroundProbe(ctx.own_pids())
    result = SCENARIOS[name](ctx)
    result.details["elapsed_s"] = round(time.monotonic() - start, 2)
    result.details["background_cores"] = round(probe.stop(ctx.own_pids()), 2)
    result.details["phases"] = ctx.phases
    result.metrics.extend(_cpu_metrics(result))
    return result


def _cpu_metrics(result: ScenarioResult) -> list[Metric]:
    """Server CPU per operation as metrics of their own (lower is better).

    On a shared 2-core machine throughput moves with the neighbours' load; the CPU a
    server spends per operation moves much less, so its ratio is the steadier one.
    Only for servers we started (we cannot see an endpoint's CPU)."""
    out = []
    for key, values in result.details.items():
        if not key.startswith("server_cpu_s_per_") or not values or any(v is None for v in values):
            continue
        what = key.removeprefix("server_cpu_s_per_")
        out.append(Metric("server CPU", f"us/{what}", [v * 1e6 for v in values], higher_is_better=False))
    return out
