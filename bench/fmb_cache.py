"""FindMissingBlobs lookups in-process on a store `bench.scale` built: cold page cache against warm.

    python -m bench.fmb_cache --store /tmp/casbah-scale/n1000000/cas --blobs 1000000 [--drop-caches]
        [--threads 1,4] [--warm-index]

Looks up `--lookups` present digests (rebuilt from `bench.scale`'s seed 1, spread over the
whole store) with `Engine.missing`, 1000 a call, and reports lookups a second and the major
page faults the process took.  `--drop-caches` writes 1 to /proc/sys/vm/drop_caches first
(root only), so the first pass reads the index from disk, as a server does after the data
pages pushed the index out of the page cache; the second pass is the warm figure.
`--threads N` runs the cold pass from N threads at once (faults in flight together: what
a FindMissingBlobs batch off the event loop buys).  `--warm-index` asks the kernel to read
the index ahead (`Engine.warm_index`) and waits for it before the cold pass.
Not a timed test: issue 13's numbers (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import sys
import threading
import time
from pathlib import Path


def present(count: int, lookups: int, salt: int) -> list:
    from bench.scale import blob
    from casbah.digest import Digest

    rng = random.Random(salt)
    out = []
    for _ in range(lookups):
        data = blob(1, rng.randrange(count))
        out.append(Digest(hashlib.sha256(data).hexdigest(), len(data)))
    return out


def timed(engine: object, digests: list, threads: int) -> dict[str, float]:
    """Lookups a second and major faults for `digests`, split over `threads` threads."""
    parts = [digests[n::threads] for n in range(threads)]
    missing = [0] * threads

    def run(n: int) -> None:
        part = parts[n]
        for i in range(0, len(part), 1000):
            missing[n] += len(engine.missing(part[i:i + 1000]))  # type: ignore[attr-defined]

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    if sum(missing):
        raise RuntimeError(f"{sum(missing)} present digests reported missing")
    return {"lookups_per_s": round(len(digests) / seconds),
            "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults}


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def main(argv: list[str] | None = None) -> int:
    from casbah.storage.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--blobs", type=int, required=True, help="blobs bench.scale put in the store")
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--threads", default="1")
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--warm-index", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    engine = Engine(Path(args.store))
    results: dict[str, object] = {"open_s": round(time.perf_counter() - started, 3)}
    try:
        for threads in (int(n) for n in args.threads.split(",")):
            digests = present(args.blobs, args.lookups, threads)
            if args.drop_caches:
                engine.flush_touches()
                drop_caches()
            if args.warm_index:
                started = time.perf_counter()
                engine.warm_index(wait=True)
                results[f"warm_index_s_{threads}"] = round(time.perf_counter() - started, 2)
            results[f"cold_{threads}_threads"] = timed(engine, digests, threads)
            results[f"warm_{threads}_threads"] = timed(engine, digests, threads)
    finally:
        engine.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
