"""Choosing the engine's inline threshold: disk bytes ÷ content and throughput per threshold.

    PYTHONPATH=. python bench/engine_threshold.py [--blobs 4000]

Writes the same mixed blobs (uniform 4-64 KiB, and 512 B) into a fresh store per
threshold through `Engine.put_many` (batches of 100, as BatchUpdateBlobs sends them),
then reads them back; prints `du` of the store ÷ content bytes, and MB/s each way.
Recorded in docs/storage-engine.md.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
import time

from casbah.digest import Digest
from casbah.storage.engine import Engine

KiB = 1024


def du(path: str) -> int:
    return int(subprocess.run(["du", "-sB1", path], capture_output=True, text=True, check=True).stdout.split()[0])


def run(threshold: int, blobs: list[tuple[Digest, bytes]]) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
        engine = Engine(root, inline_max=threshold)
        content = sum(len(b) for _, b in blobs)
        started = time.perf_counter()
        for i in range(0, len(blobs), 100):
            assert engine.put_many(blobs[i:i + 100]) == [None] * len(blobs[i:i + 100])
        write = time.perf_counter() - started
        digests = [d for d, _ in blobs]
        started = time.perf_counter()
        for i in range(0, len(digests), 100):
            _found, _corrupt, files = engine.get_inline(digests[i:i + 100])
            for digest in files:
                with open(engine.area.path(digest), "rb") as f:
                    f.read()
        read = time.perf_counter() - started
        engine.close()
        return du(root) / content, content / write / 1e6, content / read / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blobs", type=int, default=4000)
    args = parser.parse_args()
    rng = random.Random(1)
    mixes = {
        "4-64 KiB": [rng.randint(4 * KiB, 64 * KiB) for _ in range(args.blobs)],
        "512 B": [512] * (args.blobs * 4),
    }
    for name, sizes in mixes.items():
        blobs = [(Digest.of(d), d) for d in (os.urandom(n) for n in sizes)]
        for threshold in (16 * KiB, 32 * KiB, 64 * KiB):
            ratio, write, read = run(threshold, blobs)
            print(f"{name:9} inline <= {threshold // KiB:2} KiB: disk/content {ratio:.2f}, "
                  f"write {write:6.0f} MB/s, read {read:6.0f} MB/s")


if __name__ == "__main__":
    main()
