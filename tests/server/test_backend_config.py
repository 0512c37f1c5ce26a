"""One registry for every backend family: storage, ActionCache and asset-index nodes are
validated by their kind's options model (same messages for unknown keys and kinds), and
every ActionCache and asset index the server builds is wrapped in its metrics wrapper.

In process: this is config assembly (`build_instances`), no RPC involved; the wrappers'
counters are read back from the real Prometheus registry.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from casbah.assets.index import AssetKind, MetricsAssetIndex
from casbah.assets.memory import MemoryAssetIndex
from casbah.assets.sqlite import SqliteAssetIndex
from casbah.config import ConfigError, ServerConfig
from casbah.digest import Digest, DigestFunction
from casbah.errors import ActionResultNotFound
from casbah.server.app import build_instances
from casbah.storage.ac_shared import PostgresActionCache, RedisActionCache
from casbah.storage.action_cache import MetricsActionCache, RemoteActionCache, StorageActionCache


def build(tmp_path: Path, instance: dict[str, Any], storages: dict[str, Any] | None = None):
    config = ServerConfig.model_validate(
        {"listen": [], "data-dir": str(tmp_path), "storages": storages or {}, "instances": {"": instance}}
    ).with_defaults()
    instances, loader = build_instances(config)
    return instances.get(""), loader


def config_error(tmp_path: Path, instance: dict[str, Any], storages: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build(tmp_path, instance, storages)
    return str(info.value)


@pytest.mark.parametrize("where, node", [
    ("storage", {"kind": "memory", "bogus": 1}),
    ("action-cache", {"kind": "memory", "verify": False, "bogus": 1}),
    ("action-cache", {"kind": "redis", "url": "redis://127.0.0.1:1", "bogus": 1}),
    ("action-cache", {"kind": "postgres", "url": "postgresql://127.0.0.1:1/x", "bogus": 1}),
    ("action-cache", {"kind": "remote", "url": "grpc://127.0.0.1:1", "bogus": 1}),
    ("asset-index", {"kind": "memory", "bogus": 1}),
    ("asset-index", {"kind": "sqlite", "bogus": 1}),
    ("asset-index", {"kind": "redis", "url": "redis://127.0.0.1:1", "bogus": 1}),
    ("asset-index", {"kind": "postgres", "url": "postgresql://127.0.0.1:1/x", "bogus": 1}),
    ("asset-index", {"kind": "remote", "url": "grpc://127.0.0.1:1", "bogus": 1}),
])
def test_unknown_key_is_the_same_error_in_every_family(tmp_path: Path, where: str, node: dict) -> None:
    message = config_error(tmp_path, {where: node})
    assert message == f"invalid configuration in instances.''.{where}:\n  bogus: Extra inputs are not permitted"


def test_options_are_typed(tmp_path: Path) -> None:
    ttl = config_error(tmp_path, {"action-cache": {"kind": "redis", "url": "redis://127.0.0.1:1", "ttl": "soon"}})
    assert "ttl: Input should be a valid integer" in ttl
    negative = config_error(tmp_path, {"action-cache": {"kind": "redis", "url": "redis://127.0.0.1:1", "ttl": -5}})
    assert "ttl: Input should be greater than 0" in negative
    assert "url: Field required" in config_error(tmp_path, {"asset-index": {"kind": "postgres"}})
    assert "url: String should have at least 1 character" in config_error(
        tmp_path, {"action-cache": {"kind": "postgres", "url": ""}})
    # Keys of one kind are not accepted by another: `prefix` is Redis's, `compression` is remote storage's.
    assert "prefix: Extra inputs" in config_error(
        tmp_path, {"action-cache": {"kind": "postgres", "url": "postgresql://h/x", "prefix": "p"}})
    assert "compression: Extra inputs" in config_error(
        tmp_path, {"action-cache": {"kind": "remote", "url": "grpc://127.0.0.1:1", "compression": "zstd"}})


def test_unknown_kinds_name_the_known_ones(tmp_path: Path) -> None:
    ac = config_error(tmp_path, {"action-cache": {"kind": "nope"}})
    assert ac.startswith("instances.''.action-cache.kind: unknown ActionCache kind 'nope'; known: postgres, redis,"
                         " remote, or any storage kind (")
    index = config_error(tmp_path, {"asset-index": "nope"})
    assert index == ("instances.''.asset-index.kind: unknown asset-index kind 'nope'; "
                     "known: memory, postgres, redis, remote, sqlite")
    storage = config_error(tmp_path, {"storage": {"kind": "nope"}})
    assert storage.startswith("instances.''.storage.kind: unknown storage kind 'nope'; known: blob-index,")
    verified = config_error(tmp_path, {"action-cache": {"kind": "memory"}})
    assert "needs 'verify: false'" in verified


def test_each_kind_builds_its_backend_inside_a_metrics_wrapper(tmp_path: Path) -> None:
    cases = [
        ({"action-cache": {"kind": "memory", "verify": False}}, StorageActionCache, None),
        ({"action-cache": {"kind": "redis", "url": "redis://127.0.0.1:1", "ttl": 60, "prefix": "p:"}},
         RedisActionCache, None),
        ({"action-cache": {"kind": "postgres", "url": "postgresql://127.0.0.1:1/x", "instance": "i"}},
         PostgresActionCache, None),
        ({"action-cache": {"kind": "remote", "url": "grpc://127.0.0.1:1", "retries": 1}}, RemoteActionCache, None),
        ({"action-cache": "up"}, RemoteActionCache, None),  # a named remote *storage* node forwards too
        ({"asset-index": "memory"}, None, MemoryAssetIndex),
        ({"asset-index": {"kind": "sqlite", "path": str(tmp_path / "i.db")}}, None, SqliteAssetIndex),
    ]
    for instance, ac_type, index_type in cases:
        inst, loader = build(tmp_path, instance, {"up": {"kind": "remote", "url": "grpc://127.0.0.1:1"}})
        assert isinstance(inst.action_cache, MetricsActionCache)
        index = inst.extras["asset"].index
        assert isinstance(index, MetricsAssetIndex)
        if ac_type is not None:
            assert isinstance(inst.action_cache.inner, ac_type), instance
        if index_type is not None:
            assert isinstance(index.inner, index_type), instance
        if isinstance(inst.action_cache.inner, RedisActionCache):
            assert (inst.action_cache.inner.ttl, inst.action_cache.inner.prefix) == (60, "p:")
        if "path" in str(instance.get("asset-index")):
            assert index.inner.path == tmp_path / "i.db"

        asyncio.run(close_all(index, inst.action_cache, *loader.all()))


async def close_all(*closeable: Any) -> None:
    for item in closeable:
        await item.close()


def _count(family: str, node: str, op: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "casbah_backend_calls_total", {"family": family, "node": node, "op": op, "outcome": outcome})
    return value or 0.0


def test_wrappers_count_hits_misses_and_calls(tmp_path: Path) -> None:
    inst, loader = build(tmp_path, {"action-cache": {"kind": "memory", "verify": False}, "asset-index": "memory"})
    ac_node, index_node = "instances.''.action-cache", "instances.''.asset-index"
    action = Digest.of(b"an action")
    before = {k: _count("action_cache", ac_node, *k) for k in (("get", "miss"), ("get", "ok"), ("put", "ok"))}
    lookups = _count("asset_index", index_node, "candidates", "miss")

    async def main() -> None:
        with pytest.raises(ActionResultNotFound):
            await inst.action_cache.get(action)
        await inst.action_cache.put(action, b"result")
        assert await inst.action_cache.get(action) == b"result"
        index = inst.extras["asset"].index
        assert await index.candidates(AssetKind.BLOB, ["urn:x"], {}, DigestFunction.SHA256) == []
        for storage in loader.all():
            await storage.close()

    asyncio.run(main())
    assert _count("action_cache", ac_node, "get", "miss") == before["get", "miss"] + 1
    assert _count("action_cache", ac_node, "get", "ok") == before["get", "ok"] + 1
    assert _count("action_cache", ac_node, "put", "ok") == before["put", "ok"] + 1
    assert _count("asset_index", index_node, "candidates", "miss") == lookups + 1
