"""`casbah serve --workers N`: N server processes sharing one port (SO_REUSEPORT).

One Python process saturates one core; several processes behind one port use
them all, with the kernel spreading connections.  Only storage that several
processes can share is allowed: disk (one LMDB index, opened by every worker), S3,
Redis, PostgreSQL, remote.  Memory storage, memory asset
indexes and anything else process-local are refused with the offending config
path, because each worker would silently hold a different cache.

The parent only supervises: it checks the ports are free, starts the workers,
restarts one that dies, and forwards SIGTERM so every worker drains.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from typing import Any

from casbah.config import ServerConfig
from casbah.logs import setup_logging
from casbah.server.app import StartupError

log = logging.getLogger("casbah.workers")

PROCESS_LOCAL_KINDS = frozenset({"memory"})


def process_local_nodes(config: ServerConfig) -> list[str]:
    """Config paths of nodes that cannot be shared between processes."""
    found: list[str] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("kind") in PROCESS_LOCAL_KINDS:
                found.append(f"{path} (kind {node['kind']})")
            for key, value in node.items():
                visit(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                visit(value, f"{path}[{i}]")

    for name, node in config.storages.items():
        visit(node, f"storages.{name}")
    for name, inst in config.instances.items():
        where = f"instances.{name!r}"
        for key in ("storage", "action_cache"):
            visit(getattr(inst, key), f"{where}.{key.replace('_', '-')}")
        index = inst.asset_index
        if index == "memory" or (isinstance(index, dict) and index.get("kind") == "memory"):
            found.append(f"{where}.asset-index (memory)")
    return found


def disk_paths(config: ServerConfig) -> list[str]:
    """The directory of every `disk` node the instances use (admin commands check they
    exist).  Named nodes count only when referenced: the HTTP front's default `opaque`
    store exists only where the front is on."""
    found: list[str] = []
    visited: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, str) and node in config.storages and node not in visited:
            visited.add(node)
            visit(config.storages[node])
        elif isinstance(node, dict):
            if node.get("kind") == "disk" and isinstance(node.get("path"), str):
                found.append(node["path"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    for inst in config.instances.values():
        visit(inst.storage)
        visit(inst.action_cache)
    return found


def check_ports_free(addresses: list[str]) -> None:
    for address in addresses:
        if address.startswith("unix:"):
            continue
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        if port == "0":
            raise StartupError(f"cannot listen on {address} with several workers: each would get a port of its own "
                               "(give a fixed port)")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, int(port)))
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {address}: {exc.strerror} (is another server using it?)"
                ) from None


def _child(config_data: dict, log_level: str, index: int) -> None:
    import asyncio

    from casbah.server.app import serve

    config = ServerConfig.model_validate(config_data)
    setup_logging(log_level, config.log_format, worker=index)
    try:
        asyncio.run(serve(config, reuse_port=True, worker=index))
    except KeyboardInterrupt:
        pass


def run_workers(config: ServerConfig, count: int, log_level: str) -> int:
    local = process_local_nodes(config)
    if local:
        raise StartupError(
            f"--workers {count} needs storage every worker can share, but these are process-local: "
            f"{'; '.join(local)}. Use disk, s3, redis, postgres or remote, or run one worker."
        )
    check_ports_free([listener.address for listener in config.listeners()])
    ctx = multiprocessing.get_context("spawn")
    data = config.model_dump(by_alias=True)
    workers: dict[int, multiprocessing.Process] = {}
    stopping = False
    restarts: list[float] = []

    def start(i: int) -> None:
        p = ctx.Process(target=_child, args=(data, log_level, i), name=f"casbah-worker-{i}")
        p.start()
        workers[i] = p

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in workers.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def reload(signum: int, frame: object) -> None:
        """SIGHUP to the parent reloads every worker's certificates and tokens."""
        for p in workers.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for i in range(count):
        start(i)
    print(f"casbah: {count} workers started", flush=True)
    code = 0
    while workers:
        for i, p in list(workers.items()):
            p.join(timeout=0.2)
            if p.is_alive():
                continue
            del workers[i]
            if stopping:
                continue
            now = time.monotonic()
            restarts[:] = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 5:
                log.error("workers keep dying (exit code %s); stopping", p.exitcode)
                code = 1
                stop(signal.SIGTERM, None)
                continue
            log.warning("worker %d exited with %s; restarting it", i, p.exitcode)
            start(i)
    return code
