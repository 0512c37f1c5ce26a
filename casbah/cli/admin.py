"""`casbah admin …`: operations on a server's storage.

With `--remote URL` a command runs inside that server (its Admin service), which is
the only safe way while it runs; on a data directory (`--config`/`--data-dir`) it runs
in this process, and refuses while a server holds the store (`admin_support.py`).
"""

from __future__ import annotations

import asyncio
import os
import sys

import click

from casbah.cli.admin_support import call_admin, refuse_if_served, remote_admin_options, remote_spec
from casbah.config import ConfigError, ServerConfig, load_config, parse_size


@click.group()
def admin() -> None:
    """Operator commands on the storage a server config describes."""


def _rate(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _local_config(config_file: str | None, data_dir: str | None, command: str) -> ServerConfig:
    """The config of a data directory this process will open itself: its stores must
    exist, and no running server may hold them."""
    config = load_config(config_file, {"data-dir": data_dir})
    refuse_if_served(config, command)
    _check_stores_exist(config, data_dir)
    return config


def _local_options(fn):
    fn = click.option("--data-dir", type=click.Path(file_okay=False),
                      help="The server's data directory (default config), when no server runs on it.")(fn)
    return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                        help="The server's config, when no server runs on its stores.")(fn)


@admin.command()
@_local_options
@remote_admin_options
@click.option("--instance", "names", multiple=True, help="Instances to scrub (default: all; with --remote: '').")
@click.option("--rate", default="100M", show_default=True, metavar="SIZE", callback=_rate,
              help="Bytes read per second at most (0 = unlimited), so builds are not starved.")
@click.option("--dry-run", is_flag=True, help="Report corrupt blobs without removing them.")
def scrub(config_file: str | None, data_dir: str | None, names: tuple[str, ...], rate: int, dry_run: bool,
          **kwargs) -> None:
    """Re-hash every stored CAS blob; remove corrupt ones; print a report.

    Exit status: 0 when every blob matched its digest, 1 when any was corrupt or
    unreadable.  Only CAS storage is scrubbed (ActionCache entries are not
    content-addressed); instances sharing a storage are scrubbed once.
    """
    spec = remote_spec(kwargs)
    if spec is not None:
        sys.exit(1 if _remote_scrub(spec, names or ("",), rate, dry_run) else 0)
    from casbah.logs import setup_logging
    from casbah.scrub import scrub as run_scrub
    from casbah.server.app import build_instances

    setup_logging("info")  # storage startup (e.g. truncated files dropped) and each corrupt blob, on stderr
    config = _local_config(config_file, data_dir, "scrub")
    unknown = sorted(set(names) - set(config.instances))
    if unknown:
        served = ", ".join(repr(n) for n in sorted(config.instances))
        raise click.BadParameter(f"unknown instance(s) {unknown}; the config has {served}", param_hint="--instance")

    async def main() -> int:
        instances, loader = build_instances(config, maintenance=True)
        problems = 0
        seen: set[int] = set()
        try:
            for instance in instances:
                if names and instance.name not in names:
                    continue
                if id(instance.cas) in seen:  # instances sharing a storage are scrubbed once
                    continue
                seen.add(id(instance.cas))
                report = await run_scrub(instance.cas, rate, remove=not dry_run)
                click.echo(f"instance {instance.name!r} ({instance.cas.describe()}): {report.line()}")
                for digest in report.corrupt:
                    click.echo(f"  corrupt: {digest}{'' if dry_run else ' (removed)'}")
                for digest, error in report.unreadable:
                    click.echo(f"  unreadable: {digest}: {error}")
                problems += len(report.corrupt) + len(report.unreadable)
        finally:
            for storage in loader.all():
                await storage.close()
        return problems

    sys.exit(1 if asyncio.run(main()) else 0)


def _check_stores_exist(config, data_dir: str | None) -> None:
    """Scrubbing checks what exists: a mistyped `--data-dir` must be an error, not an
    empty store created and reported clean."""
    from casbah.server.workers import disk_paths

    if data_dir is not None and not os.path.isdir(data_dir):
        raise ConfigError(f"--data-dir {data_dir}: no such directory")
    for path in disk_paths(config):
        if not os.path.isdir(path):
            raise ConfigError(f"disk storage {path}: no such directory (is the data directory right?)")


def _remote_scrub(spec, names: tuple[str, ...], rate: int, dry_run: bool) -> int:
    from casbah.protos.casbah.admin.v1 import admin_pb2
    from casbah.scrub import ScrubReport

    problems = 0
    for name in names:
        answer = call_admin(spec, "Scrub", admin_pb2.ScrubRequest(instance_name=name, rate_bytes_per_second=rate,
                                                                  dry_run=dry_run))
        report = ScrubReport(scanned=answer.scanned, bytes=answer.bytes, removed=answer.removed,
                             vanished=answer.vanished, seconds=answer.seconds,
                             corrupt=list(answer.corrupt), unreadable=[(u.digest, u.error) for u in answer.unreadable])
        click.echo(f"instance {name!r} ({answer.storage}) on {spec.url}: {report.line()}")
        for d in answer.corrupt:
            click.echo(f"  corrupt: {d.hash}/{d.size_bytes}{'' if dry_run else ' (removed)'}")
        for u in answer.unreadable:
            click.echo(f"  unreadable: {u.digest.hash}/{u.digest.size_bytes}: {u.error}")
        problems += len(answer.corrupt) + len(answer.unreadable)
    return problems


def _print_nodes(nodes) -> None:
    for node in nodes:
        values = " ".join(f"{k}={v}" for k, v in sorted(node.values.items()))
        click.echo(f"{node.node} ({node.kind}): {values or '(no counters)'}")


@admin.command()
@_local_options
@remote_admin_options
@click.option("--instance", default="", help="The instance whose storage to show.")
def stats(config_file: str | None, data_dir: str | None, instance: str, **kwargs) -> None:
    """Print the counters of every storage node of an instance (blobs, bytes, index size)."""
    from casbah.protos.casbah.admin.v1 import admin_pb2

    spec = remote_spec(kwargs)
    if spec is not None:
        _print_nodes(call_admin(spec, "Stats", admin_pb2.StatsRequest(instance_name=instance)).nodes)
        return
    from casbah.server.admin import node_stats

    _print_nodes(_run_local(_local_config(config_file, data_dir, "stats"), instance, node_stats))


@admin.command()
@_local_options
@remote_admin_options
@click.option("--instance", default="", help="The instance whose storage to collect.")
@click.option("--target", default="0", metavar="SIZE", callback=_rate,
              help="Evict the CAS down to this many bytes (default: to its quota).")
def gc(config_file: str | None, data_dir: str | None, instance: str, target: int, **kwargs) -> None:
    """Evict least recently used blobs down to the quota (after lowering it) or to --target."""
    from casbah.protos.casbah.admin.v1 import admin_pb2

    request = admin_pb2.GcRequest(instance_name=instance, target_bytes=target)
    spec = remote_spec(kwargs)
    if spec is not None:
        answer = call_admin(spec, "Gc", request)
    else:
        from casbah.server.admin import collect

        answer = _run_local(_local_config(config_file, data_dir, "gc"), instance,
                            lambda inst: collect(inst, target))
    click.echo(f"removed {answer.removed} blobs")
    _print_nodes(answer.nodes)


def _run_local(config: ServerConfig, name: str, work):
    """Open the config's storage in this process, run `work(instance)` and close it again."""
    from casbah.logs import setup_logging
    from casbah.server.app import build_instances

    setup_logging("info")
    if name not in config.instances:
        served = ", ".join(repr(n) for n in sorted(config.instances))
        raise click.BadParameter(f"unknown instance {name!r}; the config has {served}", param_hint="--instance")

    async def main():
        instances, loader = build_instances(config, maintenance=True)
        try:
            inst = instances.get(name)
            return await work(inst)
        finally:
            for storage in loader.all():
                await storage.close()

    try:
        return asyncio.run(main())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@admin.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="The server's config.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="The server's data directory (default config).")
def migrate(config_file: str | None, data_dir: str | None) -> None:
    """Import old file-per-blob `disk` stores into the storage engine, now.

    A server does the same on its first start; this does it ahead of time (it can
    take a while for a large cache).  Every `disk` node of the config is opened,
    which imports it; then its size is printed."""
    from casbah.logs import setup_logging
    from casbah.scrub import _disk_engine
    from casbah.server.app import build_instances

    setup_logging("info")
    config = load_config(config_file, {"data-dir": data_dir})
    refuse_if_served(config, "migrate")
    if data_dir is not None and not os.path.isdir(data_dir):  # stores missing in it are created empty
        raise ConfigError(f"--data-dir {data_dir}: no such directory")

    async def main() -> None:
        _instances, loader = build_instances(config, maintenance=True)
        try:
            for storage in loader.all():
                engine = _disk_engine(storage)
                if engine is not None:
                    stats = engine.stats()
                    click.echo(f"{engine.name} ({engine.root}): {stats['objects']} blobs, {stats['bytes']} bytes")
        finally:
            for storage in loader.all():
                await storage.close()

    asyncio.run(main())
