"""Contract factories for the composing kinds (remote, cache, size-routed, sharded,
replicated, existence-cache), registered in `contract.FACTORIES`.

Each goes through `StorageLoader`, so the contract runs on what the server builds
from config (every node wrapped in MetricsStorage).  The `remote` factory forwards
to a real `casbah serve` process on loopback.  REAPI has no delete and no listing,
so a contract case that needs either is skipped for `remote` (with the reason)
when the backend raises Unsupported; everything the case asserted before that
point has passed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from casbah.digest import DigestFunction
from casbah.errors import Unsupported
from casbah.storage.base import Storage
from casbah.storage.loader import StorageLoader, load_builtin_kinds

ROOT = Path(__file__).resolve().parent.parent.parent
MEMORY = {"kind": "memory", "max-size": 128 << 20}


def _load(node: dict) -> Storage:
    load_builtin_kinds()
    return StorageLoader({}).build(node, "contract")


def start_casbah(data_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """A `casbah serve` process on a free loopback port; returns (process, address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir.parent / f"casbah-{port}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "casbah", "serve", "--listen", address, "--data-dir",
                             str(data_dir), "--log-level", "warning", *extra],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    log.close()
    deadline = time.monotonic() + 30
    while True:  # a plain TCP probe: a gRPC channel would back off for a second after the first refusal
        if proc.poll() is not None:
            raise RuntimeError(f"casbah exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, address
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"casbah did not listen on {address}") from None
            time.sleep(0.05)


def stop_casbah(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def remote(tmp_path: Path) -> AsyncIterator[Storage]:
    # Every digest function, the legacy ones included, so the contract runs them all through the upstream.
    config = tmp_path / "upstream.yaml"
    functions = ", ".join(f.value for f in DigestFunction)
    config.write_text(f'instances:\n  "":\n    digest-functions: [{functions}]\n')
    proc, address = start_casbah(tmp_path / "upstream", "--config", str(config))
    storage = _load({"kind": "remote", "url": f"grpc://{address}", "retries": 1, "request-timeout": 30})
    try:
        yield storage
    except Unsupported as exc:
        pytest.skip(f"remote storage: {exc}")
    finally:
        await storage.close()
        stop_casbah(proc)


async def cache_memory_memory(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = _load({"kind": "cache", "fast": MEMORY, "slow": MEMORY})
    yield storage
    await storage.close()


async def size_routed_memory(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = _load({"kind": "size-routed", "small": MEMORY, "large": MEMORY, "threshold": "64K"})
    yield storage
    await storage.close()


async def sharded_3_memory(tmp_path: Path) -> AsyncIterator[Storage]:
    shards = [{"key": f"m{i}", "storage": MEMORY} for i in range(3)]
    storage = _load({"kind": "sharded", "shards": shards})
    yield storage
    await storage.close()


async def replicated_2_memory(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = _load({"kind": "replicated", "replicas": [MEMORY, MEMORY]})
    yield storage
    await storage.close()


async def existence_cache_memory(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = _load({"kind": "existence-cache", "backend": MEMORY, "ttl": 60})
    yield storage
    await storage.close()
