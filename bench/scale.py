"""Scale benchmark of the `disk` engine: startup, memory and FindMissingBlobs at millions of blobs.

    python -m bench.scale --blobs 1000000,10000000 [--work-dir DIR] [--keep]

For each size N it populates a store in-process through the engine's bulk path
(`Engine.bulk_load`, one LMDB transaction per 10k blobs), then starts `casbah serve`
on it and measures what issue 13 asks:

- startup: seconds from spawning the server until GetCapabilities answers (warm page
  cache: the store was just written; an empty store is measured the same way for scale);
- RssAnon of the server idle, and at the end of FindMissingBlobs load (RssAnon leaves out
  the mapped index, which the kernel pages in and out: that is the memory the process owns);
- FindMissingBlobs throughput (1000 digests a request, half present, spread over the whole
  store, half absent), against the same load on a 10k-blob store;
- disk bytes (`du`) ÷ content bytes for the whole store, and on two small stores of only
  512 B blobs and only 4-64 KiB blobs.

Blob sizes (mostly small, so 10M fit in ~12 GB of content): 88 % 512 B, 8 % 1-4 KiB,
3.5 % 4-16 KiB, 0.5 % 16-64 KiB (mean ~1.2 KiB).  A blob is a function of (seed, index):
a 16-byte header and a slice of a fixed random pool, so any sample can be rebuilt later
without keeping 10M digests.  Not a timed test: a 10M population takes tens of minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_POOL = random.Random(0x5CA1E).randbytes(1 << 20)
_MASK = (1 << 64) - 1
#: (cumulative share in 1/1000, min size, max size)
CLASSES = ((880, 512, 512), (960, 1024, 4096), (995, 4097, 16384), (1000, 16385, 65536))


def _mix(x: int) -> int:
    """splitmix64: a well-spread 64-bit value from an index."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def blob(seed: int, index: int, classes: tuple = CLASSES) -> bytes:
    r = _mix(seed * 0x100000000 + index)
    share = r % 1000
    for limit, lo, hi in classes:
        if share < limit:
            size = lo + (r >> 10) % (hi - lo + 1)
            break
    header = seed.to_bytes(4, "little") + index.to_bytes(12, "little")
    start = (r >> 32) % (len(_POOL) - size)
    return header + _POOL[start:start + size - 16]


def blobs(seed: int, count: int, classes: tuple = CLASSES) -> Iterator[tuple[object, bytes]]:
    from casbah.digest import Digest

    sha = hashlib.sha256
    for i in range(count):
        data = blob(seed, i, classes)
        yield Digest(sha(data).hexdigest(), len(data)), data


def populate(path: Path, count: int, seed: int, classes: tuple = CLASSES) -> dict[str, float]:
    """Fill a fresh store with `count` blobs; (blobs, content bytes, seconds)."""
    from casbah.storage.engine import Engine

    shutil.rmtree(path, ignore_errors=True)
    engine = Engine(path)
    content = 0
    started = time.monotonic()
    last = started

    def counted() -> Iterator[tuple[object, bytes]]:
        nonlocal content, last
        for n, (digest, data) in enumerate(blobs(seed, count, classes)):
            content += len(data)
            if n and n % 500_000 == 0 and time.monotonic() - last > 30:
                last = time.monotonic()
                print(f"  {n} blobs, {n / (last - started):.0f}/s", file=sys.stderr, flush=True)
            yield digest, data

    try:
        stored = engine.bulk_load(counted(), batch=10_000)  # type: ignore[arg-type]
    finally:
        engine.close()
    seconds = time.monotonic() - started
    return {"blobs": stored, "content_bytes": content, "seconds": round(seconds, 1),
            "blobs_per_s": round(stored / seconds)}


def du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Server:
    """`casbah serve` on a data dir whose `cas/` is the populated store."""

    def __init__(self, data_dir: Path) -> None:
        from bench.targets import free_port

        self.address = f"127.0.0.1:{free_port()}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.log = open(data_dir / "serve.log", "wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "casbah", "serve", "--listen", self.address, "--data-dir", str(data_dir)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        self.startup = self._wait()

    def _wait(self) -> float:
        import grpc

        from bench.common import CHANNEL_OPTIONS, re_grpc, re_pb2

        # A channel whose first connect is refused (the server is still starting) waits out gRPC's
        # reconnect backoff, 1 s at first, before it tries again: with the default backoff this
        # measured the client's backoff (0.9-1.2 s for a server listening after 0.3 s), not the server.
        backoff = [("grpc.initial_reconnect_backoff_ms", 10), ("grpc.min_reconnect_backoff_ms", 10),
                   ("grpc.max_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS + backoff) as channel:
            stub = re_grpc.CapabilitiesStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}")
                try:
                    stub.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=2.0)
                    return time.monotonic() - self.started
                except grpc.RpcError:
                    time.sleep(0.01)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def fmb_requests(seed: int, count: int, requests: int, per: int = 1000) -> list[bytes]:
    """Serialized FindMissingBlobs requests: half present digests spread over the store, half absent."""
    from bench.common import re_pb2

    rng = random.Random(seed + 7)
    out = []
    for r in range(requests):
        req = re_pb2.FindMissingBlobsRequest()
        for _ in range(per // 2):
            data = blob(seed, rng.randrange(count))
            req.blob_digests.add(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        for i in range(per - per // 2):
            req.blob_digests.add(hash=hashlib.sha256(b"absent %d %d" % (r, i)).hexdigest(), size_bytes=100 + i)
        out.append(req.SerializeToString())
    return out


def fmb_load(server: Server, requests: list[bytes], seconds: float, threads: int = 4) -> tuple[float, int]:
    """Digests a second over `seconds` of load from `threads` client threads; peak RssAnon."""
    from bench.common import make_channel, re_pb2

    done = [0] * threads
    stop = time.monotonic() + seconds
    peak = 0

    def run(n: int) -> None:
        with make_channel(server.address) as channel:
            call = channel.unary_unary(
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
                request_serializer=lambda b: b, response_deserializer=re_pb2.FindMissingBlobsResponse.FromString)
            i = n
            while time.monotonic() < stop:
                resp = call(requests[i % len(requests)], timeout=30)
                if len(resp.missing_blob_digests) < 500:
                    raise RuntimeError("present digests reported missing")
                done[n] += 1000
                i += threads

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    started = time.monotonic()
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        peak = max(peak, rss_anon(server.process.pid))
        time.sleep(0.25)
    return sum(done) / (time.monotonic() - started), peak


def measure(data_dir: Path, count: int, seed: int, fmb_seconds: float) -> dict[str, object]:
    server = Server(data_dir)
    try:
        time.sleep(3)
        idle = rss_anon(server.process.pid)
        requests = fmb_requests(seed, count, 100)
        fmb, peak = fmb_load(server, requests, fmb_seconds)
        after = rss_anon(server.process.pid)
    finally:
        server.stop()
    # A second start: the first one's import of Python modules is then warm too.
    server = Server(data_dir)
    server.stop()
    return {"startup_s": round(server.startup, 2), "rss_anon_idle_mb": round(idle / 1e6, 1),
            "rss_anon_fmb_peak_mb": round(max(peak, after) / 1e6, 1), "fmb_digests_per_s": round(fmb)}


def ratio_store(path: Path, count: int, classes: tuple, seed: int) -> dict[str, float]:
    info = populate(path, count, seed, classes)
    disk = du(path)
    return {"blobs": count, "content_bytes": info["content_bytes"], "disk_bytes": disk,
            "ratio": round(disk / info["content_bytes"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs", default="1000000,10000000", help="store sizes, comma-separated")
    parser.add_argument("--work-dir", default="/tmp/casbah-scale")
    parser.add_argument("--fmb-seconds", type=float, default=15.0)
    parser.add_argument("--reuse", action="store_true", help="measure stores a previous run left (--keep)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--skip-ratios", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}

    def emit(name: str, value: object) -> None:
        results[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    if not args.skip_ratios:
        emit("ratio_512B", ratio_store(work / "r512" / "cas", 200_000, ((1000, 512, 512),), 11))
        emit("ratio_4-64KiB", ratio_store(work / "r4k" / "cas", 20_000, ((1000, 4096, 65536),), 12))
        shutil.rmtree(work / "r512", ignore_errors=True)
        shutil.rmtree(work / "r4k", ignore_errors=True)
    for count in [10_000, *(int(n) for n in args.blobs.split(","))]:
        data_dir = work / f"n{count}"
        store = data_dir / "cas"
        if args.reuse and (store / "index" / "data.mdb").exists():
            info: dict[str, object] = {"reused": True}
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
            info = dict(populate(store, count, 1))
        info["disk_bytes"] = du(store)
        if "content_bytes" in info:
            info["disk_ratio"] = round(int(info["disk_bytes"]) / int(info["content_bytes"]), 3)  # type: ignore[call-overload]
        info.update(measure(data_dir, count, 1, args.fmb_seconds))
        emit(f"n{count}", info)
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    empty = work / "empty"
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir()
    server = Server(empty)
    server.stop()
    emit("empty_startup_s", round(server.startup, 2))
    shutil.rmtree(empty, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
