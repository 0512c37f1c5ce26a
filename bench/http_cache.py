"""The `http` scenario: the HTTP cache front against gRPC, on one casbah server.

A casbah with `--http-listen` is started for the scenario (whatever the run's target:
the peers have no HTTP front), and the same load runs over both protocols from the
load-generator processes: 4 KiB blobs one PUT / one ByteStream.Write each, then read
back one GET / one ByteStream.Read each (4 processes); a 256 MiB blob PUT and GET
against ByteStream.Write and Read (one stream).  Every byte read is compared with what
was written.  HTTP clients use `http.client` with keep-alive, as Bazel's and ccache's
HTTP clients keep their connections.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import Dataset, VerificationError, slice_indices
from bench.context import Metric, ScenarioResult
from bench.jobs import BigReadJob, BigWriteJob, SmallReadJob, SmallWriteJob, _big_blob
from bench.loadgen import JobResult, WorkerContext
from bench.targets import server_cpu_seconds, start_target, stop_target

MiB = 1024 * 1024
SMALL = 4096


def _connection(address: str) -> http.client.HTTPConnection:
    host, _, port = address.rpartition(":")
    return http.client.HTTPConnection(host, int(port), timeout=600)


@dataclass
class HttpSmallPutJob:
    address: str
    dataset: Dataset
    start: int
    stop: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blobs = [(f"/cas/{d.hash}", data) for d, data in self.dataset.blobs(range(self.start, self.stop))]
        self._conn = _connection(self.address)

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for path, data in self._blobs:
            t0 = time.monotonic()
            self._conn.request("PUT", path, body=data)
            response = self._conn.getresponse()
            response.read()
            if response.status != 200:
                raise VerificationError(f"PUT {path}: HTTP {response.status}")
            result.latencies.append(time.monotonic() - t0)
            result.ops += 1
            result.bytes += len(data)
        return result


@dataclass
class HttpSmallGetJob:
    address: str
    dataset: Dataset
    start: int
    stop: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blobs = [(f"/cas/{d.hash}", data) for d, data in self.dataset.blobs(range(self.start, self.stop))]
        self._conn = _connection(self.address)

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for path, data in self._blobs:
            t0 = time.monotonic()
            self._conn.request("GET", path)
            response = self._conn.getresponse()
            body = response.read()
            if response.status != 200 or body != data:
                raise VerificationError(f"GET {path}: HTTP {response.status}, {len(body)} bytes differ")
            result.latencies.append(time.monotonic() - t0)
            result.ops += 1
            result.bytes += len(data)
        return result


@dataclass
class HttpBigPutJob:
    """PUT one variant of the big blob (as BigWriteJob's), streamed in 1 MiB pieces."""

    address: str
    size: int
    variant: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blob = _big_blob(ctx, self.size)
        self._conn = _connection(self.address)

    def run(self, ctx: WorkerContext) -> JobResult:
        blob, digest = self._blob, self._blob.digest(self.variant)
        pieces = (blob.expected(self.variant, o, min(o + MiB, self.size)) for o in range(0, self.size, MiB))
        t0 = time.monotonic()
        self._conn.request("PUT", f"/cas/{digest.hash}", body=pieces, headers={"Content-Length": str(self.size)})
        response = self._conn.getresponse()
        response.read()
        if response.status != 200:
            raise VerificationError(f"PUT big blob: HTTP {response.status}")
        return JobResult(ops=1, bytes=self.size, latencies=[time.monotonic() - t0])


@dataclass
class HttpBigGetJob:
    address: str
    size: int
    variant: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blob = _big_blob(ctx, self.size)
        self._conn = _connection(self.address)

    def run(self, ctx: WorkerContext) -> JobResult:
        blob, digest = self._blob, self._blob.digest(self.variant)
        t0 = time.monotonic()
        self._conn.request("GET", f"/cas/{digest.hash}")
        response = self._conn.getresponse()
        offset = 0
        buffer = bytearray(MiB)
        while n := response.readinto(buffer):
            if not blob.expected(self.variant, offset, offset + n) == memoryview(buffer)[:n]:
                raise VerificationError(f"GET big blob: bytes {offset}..{offset + n} differ")
            offset += n
        if response.status != 200 or offset != self.size:
            raise VerificationError(f"GET big blob: HTTP {response.status}, {offset} bytes")
        return JobResult(ops=1, bytes=self.size, latencies=[time.monotonic() - t0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_cache(ctx):
    """HTTP vs gRPC on one casbah: 4 KiB writes/reads (blobs/s) and 256 MiB write/read (MB/s)."""
    work = Path(tempfile.mkdtemp(prefix="casbah-http-"))
    http_address = f"127.0.0.1:{_free_port()}"
    server = start_target("casbah", work, casbah_args=["--http-listen", http_address], install=False)
    count = ctx.scaled(5000, minimum=100)
    size = ctx.scaled(256 * MiB, minimum=MiB)
    parts = min(ctx.processes, count)
    slices = [slice_indices(count, parts, p) for p in range(parts)]
    figures: dict[str, list[float]] = {}
    cpu: dict[str, list[float | None]] = {}

    def note(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    def phase(jobs: list, label: str, name: str, unit_bytes: int | None = None):
        """A phase with this scenario's own server's CPU per operation (per MiB for big blobs)."""
        cpu0 = server_cpu_seconds(server)
        result = ctx.phase(jobs, label)
        cpu1 = server_cpu_seconds(server)
        ops = result.bytes // unit_bytes if unit_bytes else result.ops
        spent = None if cpu0 is None or cpu1 is None or not ops else (cpu1 - cpu0) / ops
        cpu.setdefault(f"server_cpu_s_per_{name}", []).append(spent)
        return result

    try:
        grpc_address = server.address
        for r in range(ctx.repeats(2)):
            for proto in ("gRPC", "HTTP"):
                dataset = Dataset(ctx.new_seed(f"http-small-{proto}-{r}"), count, SMALL, SMALL)
                if proto == "HTTP":
                    writes = [HttpSmallPutJob(http_address, dataset, s.start, s.stop) for s in slices]
                    reads = [HttpSmallGetJob(http_address, dataset, s.start, s.stop) for s in slices]
                else:
                    writes = [SmallWriteJob(grpc_address, "", dataset, s.start, s.stop, 16 * 1024) for s in slices]
                    reads = [SmallReadJob(grpc_address, "", dataset, s.start, s.stop) for s in slices]
                w = phase(writes, f"{proto} 4 KiB writes", f"{proto}_4KiB_write")
                rd = phase(reads, f"{proto} 4 KiB reads", f"{proto}_4KiB_read")
                if w.ops != count or rd.ops != count:
                    raise VerificationError(f"{proto} small: {w.ops} writes / {rd.ops} reads, {count} expected")
                note(f"{proto} 4KiB write", w.ops_per_s)
                note(f"{proto} 4KiB read", rd.ops_per_s)
                variant = ctx.new_seed(f"http-big-{proto}-{r}") & 0xFFFFFFFF
                if proto == "HTTP":
                    big_w = [HttpBigPutJob(http_address, size, variant)]
                    big_r = [HttpBigGetJob(http_address, size, variant)]
                else:
                    big_w = [BigWriteJob(grpc_address, "", size, variant, MiB)]
                    big_r = [BigReadJob(grpc_address, "", size, variant)]
                bw = phase(big_w, f"{proto} big write", f"{proto}_MiB_big_write", MiB)
                br = phase(big_r, f"{proto} big read", f"{proto}_MiB_big_read", MiB)
                note(f"{proto} big write", bw.bytes_per_s / 1e6)
                note(f"{proto} big read", br.bytes_per_s / 1e6)
    finally:
        stop_target(server)
        shutil.rmtree(work, ignore_errors=True)
    metrics = [Metric(name, "blobs/s" if "4KiB" in name else "MB/s", values) for name, values in figures.items()]
    return ScenarioResult(metrics, {"small_blobs": count, "small_bytes": SMALL, "big_blob_bytes": size,
                                    "processes": parts, "server": "casbah serve --http-listen (disk)", **cpu})
