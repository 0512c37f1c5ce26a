"""Contract factories for the scale-out kinds (s3, redis, blob-index), registered in
`contract.FACTORIES`.

They run against real servers on loopback, shared by the whole test process
(tests/scale/scale_env.py starts them on first use): moto's S3 server,
redis-server and PostgreSQL 15.  Each test gets an empty store by giving it a key
prefix (or blob-index store name) of its own, and deletes what it stored
afterwards so the in-memory S3 server does not grow with the suite.  A factory
skips, saying why, when its server is not installed.

Redis is meant for small blobs (the examples route blobs > 64 KiB elsewhere), but
the contract includes multi-MiB blobs: the `redis` factory raises max-blob-size so
every case runs on Redis itself, and `size_routed_redis_s3` is the example's
topology (small blobs in Redis, large ones in S3 behind an existence cache).
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scale"))

import scale_env

from casbah.storage.base import Storage
from casbah.storage.loader import StorageLoader, load_builtin_kinds


def _load(node: dict) -> Storage:
    load_builtin_kinds()
    return StorageLoader({}).build(node, "contract")


def s3_node(**options: str) -> dict:
    server = scale_env.s3()
    return {"kind": "s3", "endpoint": server.endpoint, "bucket": "contract", "prefix": f"{uuid.uuid4().hex}/",
            "create-bucket": True, "access-key": scale_env.S3_ACCESS_KEY, "secret-key": scale_env.S3_SECRET_KEY,
            "region": "us-east-1", **options}


def redis_node(**options: str) -> dict:
    return {"kind": "redis", "url": scale_env.redis().url, "prefix": f"contract:{uuid.uuid4().hex}:", **options}


@contextlib.asynccontextmanager
async def _cleaned(storage: Storage) -> AsyncIterator[Storage]:
    try:
        yield storage
    finally:
        with contextlib.suppress(Exception):
            await storage.delete([info.digest async for info in storage.iterate()])
        await storage.close()


async def s3(tmp_path: Path) -> AsyncIterator[Storage]:
    """Blobs up to 1 MiB are one verified PUT; larger ones a multipart upload completed
    only once verified (blob_index_s3 and size_routed_redis_s3 run S3 with the default
    8 MiB threshold, so multi-MiB PUTs are covered there)."""
    async with _cleaned(_load(s3_node(**{"multipart-threshold": "1M", "part-size": "5M"}))) as storage:
        yield storage


async def redis(tmp_path: Path) -> AsyncIterator[Storage]:
    async with _cleaned(_load(redis_node(**{"max-blob-size": "16M"}))) as storage:
        yield storage


async def size_routed_redis_s3(tmp_path: Path) -> AsyncIterator[Storage]:
    node = {"kind": "size-routed", "threshold": "64K", "small": redis_node(**{"max-blob-size": "64K"}),
            "large": {"kind": "existence-cache", "backend": s3_node(), "ttl": 60}}
    async with _cleaned(_load(node)) as storage:
        yield storage


async def blob_index_s3(tmp_path: Path) -> AsyncIterator[Storage]:
    node = {"kind": "blob-index", "url": scale_env.postgres().url, "store": uuid.uuid4().hex,
            "backend": s3_node()}
    async with _cleaned(_load(node)) as storage:
        yield storage
