"""`casbah admin …`: operations on a server's storage, run beside (or instead of) the server."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from casbah.config import ConfigError, load_config, parse_size


@click.group()
def admin() -> None:
    """Operator commands on the storage a server config describes."""


def _rate(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@admin.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="The server's config.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="The server's data directory (default config).")
@click.option("--instance", "names", multiple=True, help="Instances to scrub (default: all).")
@click.option("--rate", default="100M", show_default=True, metavar="SIZE", callback=_rate,
              help="Bytes read per second at most (0 = unlimited), so builds are not starved.")
@click.option("--dry-run", is_flag=True, help="Report corrupt blobs without removing them.")
def scrub(config_file: str | None, data_dir: str | None, names: tuple[str, ...], rate: int, dry_run: bool) -> None:
    """Re-hash every stored CAS blob; remove corrupt ones; print a report.

    Exit status: 0 when every blob matched its digest, 1 when any was corrupt or
    unreadable.  Only CAS storage is scrubbed (ActionCache entries are not
    content-addressed); instances sharing a storage are scrubbed once.
    """
    from casbah.logs import setup_logging
    from casbah.scrub import scrub as run_scrub
    from casbah.server.app import build_instances

    setup_logging("info")  # storage startup (e.g. truncated files dropped) and each corrupt blob, on stderr
    config = load_config(config_file, {"data-dir": data_dir})
    _check_stores_exist(config, data_dir)
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
