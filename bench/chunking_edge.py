"""Content-defined chunking through an edge cache, and `cas download` over an older file.

Real processes over loopback: an upstream `casbah serve` on disk (default chunking, 512 KiB
average) with its metrics endpoint, and edges started with `examples/edge-cache.yaml`.
Bytes are counted at the upstream: `casbah_storage_bytes_total` (in = written into its
storage, i.e. what arrived; out = read from it, i.e. what it served), scraped before and
after each step.

(a) a client uploads v1 then v2 (1 MiB changed in the middle) through edge 1 by plain
    ByteStream (as Bazel without chunking does): what edge 1 sends upstream for v2;
    a client reads v1 then v2 through a fresh edge 2: what edge 2 receives for v2;
    disk use of the upstream and both edges.
(b) `casbah cas download` of v2 from the upstream to a file holding v1: bytes received.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import grpc

from casbah.client.download import download_file
from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.reapi.channel import RemoteSpec
from casbah.streams import file_chunks

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def _du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _start(args: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "casbah", "serve", "--listen", f"127.0.0.1:{port}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            cwd=ROOT)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
    return proc


def _bytes(metrics_port: int) -> tuple[int, int]:
    """(in, out) summed over the upstream's storage nodes."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    totals = {"in": 0.0, "out": 0.0}
    for line in text.splitlines():
        if line.startswith("casbah_storage_bytes_total{"):
            labels, value = line.rsplit(" ", 1)
            for direction in totals:
                if f'direction="{direction}"' in labels:
                    totals[direction] += float(value)
    return int(totals["in"]), int(totals["out"])


def _file_chunks(path: Path):
    return lambda offset: file_chunks(path, offset)


def _digest(path: Path) -> Digest:
    with open(path, "rb") as f:
        return Digest(hashlib.file_digest(f, "sha256").hexdigest(), path.stat().st_size)


def run(size_mib: int, port: int) -> None:
    size = size_mib * MIB
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        v1, v2 = root / "v1.bin", root / "v2.bin"
        rng = os.urandom
        with open(v1, "wb") as f:
            for _ in range(size_mib):
                f.write(rng(MIB))
        data = bytearray(v1.read_bytes())
        data[size // 2:size // 2 + MIB] = rng(MIB)
        v2.write_bytes(bytes(data))
        del data
        d1, d2 = _digest(v1), _digest(v2)
        up_port, metrics_port, edge1_port, edge2_port = port, port + 1, port + 2, port + 3
        procs = [_start(["--data-dir", str(root / "up"), "--metrics-listen", f"127.0.0.1:{metrics_port}"], up_port)]
        upstream = f"grpc://127.0.0.1:{up_port}"
        try:
            for name, edge_port in (("edge1", edge1_port), ("edge2", edge2_port)):
                procs.append(_start(["--config", str(ROOT / "examples" / "edge-cache.yaml")], edge_port,
                                    {"CASBAH_UPSTREAM": upstream, "CASBAH_DATA_DIR": str(root / name),
                                     "CASBAH_EDGE_SIZE": "4G"}))
            with RemoteClient(RemoteSpec(f"grpc://127.0.0.1:{edge1_port}")) as client:
                client.run(client.client.write_reopenable(d1, _file_chunks(v1)))
                in0, _ = _bytes(metrics_port)
                client.run(client.client.write_reopenable(d2, _file_chunks(v2)))
                in1, _ = _bytes(metrics_port)
            sent_up = in1 - in0
            with RemoteClient(RemoteSpec(f"grpc://127.0.0.1:{edge2_port}")) as client:
                assert sum(len(p) for p in client.read_stream(d1)) == size
                _, out0 = _bytes(metrics_port)
                assert sum(len(p) for p in client.read_stream(d2)) == size
                _, out1 = _bytes(metrics_port)
            received_edge = out1 - out0
            disk = {name: _du(root / name) for name in ("up", "edge1", "edge2")}
            dest = root / "dest.bin"
            dest.write_bytes(v1.read_bytes())
            with RemoteClient(RemoteSpec(upstream)) as client:
                _, out0 = _bytes(metrics_port)
                received = download_file(client, d2, dest)
                _, out1 = _bytes(metrics_port)
            assert _digest(dest) == d2
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
    pct = 100 / size
    print(f"edge write of v2 after v1 (client by ByteStream): upstream received {sent_up / MIB:.2f} MiB "
          f"({sent_up * pct:.2f} %)")
    print(f"edge read of v2 by an edge holding v1: upstream served {received_edge / MIB:.2f} MiB "
          f"({received_edge * pct:.2f} %)")
    print(f"disk after both versions: upstream {disk['up'] / MIB:.1f} MiB, edge 1 (wrote both) "
          f"{disk['edge1'] / MIB:.1f} MiB, edge 2 (read both) {disk['edge2'] / MIB:.1f} MiB")
    print(f"cas download of v2 over v1: {received / MIB:.2f} MiB received ({received * pct:.2f} %), "
          f"upstream served {(out1 - out0) / MIB:.2f} MiB")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--port", type=int, default=50299)
    options = parser.parse_args()
    run(options.size_mib, options.port)
