"""Content-defined chunking, measured: `python -m bench.chunking [--size-mib 256]`.

A file of SIZE MiB is pushed through a local cache, changed by 1 MiB in the middle and
pushed again; a second cache pulls both versions in turn.  Reported: bytes each
transfer moved, the server's disk use after one and after two versions, SplitBlob of a
blob uploaded whole (wall time and the server's CPU time from /proc), and FastCDC's
throughput against SHA-256 on one core.  A real `casbah serve` on disk storage, the
REAPI's default parameters (512 KiB average).

Then through an edge (`bench.chunking_edge`): an upstream and edges as real processes
(`examples/edge-cache.yaml`), bytes counted at the upstream (its storage byte metrics).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from casbah.cdc import FastCdcParams
from casbah.client.remote import RemoteClient
from casbah.client.sync import pull, push
from casbah.digest import Digest
from casbah.local import LocalCache
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.reapi.channel import RemoteSpec

MIB = 1 << 20


def _du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _write_random(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(rng.randbytes(MIB))


def _serve(data: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "casbah", "serve", "--listen", f"127.0.0.1:{port}",
                             "--data-dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--port", type=int, default=50199)
    args = parser.parse_args()
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        v1, v2 = root / "v1" / "big.bin", root / "v2" / "big.bin"
        v1.parent.mkdir()
        v2.parent.mkdir()
        _write_random(v1, size, 1)
        with open(v1, "rb") as src, open(v2, "wb") as dst:
            while piece := src.read(MIB):
                dst.write(piece)
        with open(v2, "r+b") as f:
            f.seek(size // 2)
            f.write(random.Random(2).randbytes(MIB))
        server = _serve(root / "server", args.port)
        url = f"grpc://127.0.0.1:{args.port}"
        try:
            mine = LocalCache(root / "cache-a")
            mine.commit(v1.parent, ref="big/v1", link=False)
            with RemoteClient(RemoteSpec(url)) as client:
                p1 = push(mine, client, "big/v1")
                disk1 = _du(root / "server" / "cas")
                mine.commit(v2.parent, ref="big/v2")
                p2 = push(mine, client, "big/v2")
                disk2 = _du(root / "server" / "cas")
            theirs = LocalCache(root / "cache-b")
            with RemoteClient(RemoteSpec(url)) as client:
                q1 = pull(theirs, client, "big/v1")
                q2 = pull(theirs, client, "big/v2")
            # SplitBlob of a blob uploaded whole (a third version, by ByteStream, chunking off client-side).
            v3 = root / "v3.bin"
            _write_random(v3, size, 3)
            blob = Digest(hashlib.file_digest(open(v3, "rb"), "sha256").hexdigest(), size)
            with RemoteClient(RemoteSpec(url)) as client:
                client.run(client.client.write_reopenable(blob, lambda off: _chunks(v3, off)))
            with grpc.insecure_channel(f"127.0.0.1:{args.port}") as ch:
                cpu0, t0 = _cpu(server.pid), time.perf_counter()
                response = re_grpc.ContentAddressableStorageStub(ch).SplitBlob(
                    re_pb2.SplitBlobRequest(blob_digest=blob.to_proto()), timeout=600)
                split_s, split_cpu = time.perf_counter() - t0, _cpu(server.pid) - cpu0
        finally:
            server.terminate()
            server.wait()
        cdc_mbs, sha_mbs = _throughput(v1)
    pct = 100 / size
    print(f"file {args.size_mib} MiB, 1 MiB changed in the middle, FastCDC avg 512 KiB")
    print(f"push v1: {p1.bytes_sent / MIB:.1f} MiB sent; push v2: {p2.bytes_sent / MIB:.2f} MiB "
          f"({p2.bytes_sent * pct:.2f} %)")
    print(f"pull v1: {q1.bytes_sent / MIB:.1f} MiB received; pull v2 into a cache holding v1: "
          f"{q2.bytes_sent / MIB:.2f} MiB ({q2.bytes_sent * pct:.2f} %)")
    print(f"server disk (cas): one version {disk1 / MIB:.1f} MiB, two versions {disk2 / MIB:.1f} MiB "
          f"({disk2 / disk1:.3f}x)")
    print(f"SplitBlob of a {args.size_mib} MiB blob uploaded whole: {split_s:.2f} s wall, {split_cpu:.2f} s "
          f"server CPU, {len(response.chunk_digests)} chunks")
    print(f"one core: FastCDC {cdc_mbs:.0f} MB/s, sha256 {sha_mbs:.0f} MB/s")
    from bench.chunking_edge import run as run_edge

    run_edge(args.size_mib, args.port + 1)


async def _chunks(path: Path, offset: int):
    f = open(path, "rb")  # noqa: ASYNC230 (a benchmark's upload source; local disk)
    try:
        f.seek(offset)
        while piece := f.read(MIB):
            yield piece
    finally:
        f.close()


def _throughput(path: Path) -> tuple[float, float]:
    import mmap

    with open(path, "rb") as f:
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    view[::4096].tobytes()  # paged in, so both measure CPU
    t0 = time.perf_counter()
    count = sum(1 for _ in FastCdcParams().chunker().cut_buf(view))
    cdc = len(view) / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    hashlib.sha256(view).digest()
    sha = len(view) / (time.perf_counter() - t0) / 1e6
    assert count > 0
    return cdc, sha


if __name__ == "__main__":
    main()
