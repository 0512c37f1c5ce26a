"""`casbah cache …`: the local CAS cache and its sync with remotes."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime

import click

from casbah import humanize
from casbah.cli.remotes import remotes_options, specs_from
from casbah.client.config import load_client_config
from casbah.client.multi import describe, pull_first, push_all
from casbah.client.sync import DEFAULT_URI_TEMPLATE, PUBLISH_MODES
from casbah.config import parse_size
from casbah.local import LocalCache

DEFAULT_CACHE_DIR = "~/.cache/casbah"


def _cache(cache_dir: str | None) -> LocalCache:
    """The cache at --cache-dir (else the client config's `cache-dir`), with the config's
    `quota`, which commit and pull then enforce."""
    config = load_client_config()
    chosen = cache_dir or config.cache_dir or DEFAULT_CACHE_DIR
    return LocalCache(os.path.expanduser(chosen), quota=config.quota)


def _report_gc(local: LocalCache) -> None:
    report = local.last_gc
    if report is not None and (report.refs_removed or report.objects_removed):
        click.echo(f"quota {humanize.size(local.quota or 0)}: evicted {humanize.count(len(report.refs_removed), 'ref')}"
                   f", {humanize.size(report.bytes_removed)}", err=True)


cache_dir_option = click.option(
    "--cache-dir", envvar="CASBAH_CACHE_DIR", default=None,
    help=f"Local cache directory (env CASBAH_CACHE_DIR; else the config's cache-dir; else {DEFAULT_CACHE_DIR}).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
path_option = click.option("--path", "subdir", default="", metavar="SUBDIR",
                           help="Only this subdirectory of the tree (e.g. usr/lib).")
publish_option = click.option(
    "--publish", type=click.Choice(PUBLISH_MODES), default="asset", show_default=True,
    help="How ref names are published on the server: Remote Asset, BuildStream ReferenceStorage, or not at all.",
)
external_links_option = click.option(
    "--allow-external-symlinks", is_flag=True,
    help="Write symlinks of the tree that are absolute or point outside it (refused by default).",
)
uri_option = click.option("--uri-template", default=DEFAULT_URI_TEMPLATE, show_default=True,
                          help="Remote Asset URI of a ref ({ref} is replaced).")


class CasbahCommand(click.Command):
    """A casbah command.  Errors are reported by the root group (casbah/cli/errors.py):
    one line, no traceback; this class stays so commands can say where they belong."""


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group()
def cache() -> None:
    """A local content-addressable cache of directory trees with named refs."""


@cache.command(cls=CasbahCommand)
@cache_dir_option
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--ref", "refs", multiple=True, help="Name the committed tree (repeatable; names may contain '/').")
@click.option("--link", is_flag=True, help="Hard-link files into the cache instead of copying (makes them read-only).")
def commit(cache_dir: str | None, directory: str, refs: tuple[str, ...], link: bool) -> None:
    """Store DIRECTORY; print its root digest."""
    local = _cache(cache_dir)
    click.echo(str(local.commit(directory, ref=refs, link=link)))
    _report_gc(local)


@cache.command(cls=CasbahCommand)
@cache_dir_option
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--link", is_flag=True,
              help="Hard-link the cache's read-only objects instead of copying: for read-only consumers only.")
@click.option("--copy", is_flag=True, hidden=True, help="Copy files (the default; kept for old scripts).")
@click.option("--verify", is_flag=True, help="Re-hash every object first; an edited one is an error (and removed).")
@path_option
@external_links_option
def checkout(cache_dir: str | None, ref: str, dest: str, link: bool, copy: bool, verify: bool, subdir: str,
             allow_external_symlinks: bool) -> None:
    """Materialize REF (a ref name or HASH/SIZE) into DEST as ordinary files."""
    if link and copy:
        raise click.UsageError("--link and --copy exclude each other")
    local = _cache(cache_dir)
    files = local.checkout(local.resolve(ref), dest, link=link, allow_external_symlinks=allow_external_symlinks,
                           verify=verify, path=subdir)
    click.echo(f"checked out {humanize.count(files, 'file')} into {dest}", err=True)


@cache.command(cls=CasbahCommand)
@cache_dir_option
@click.argument("ref_a")
@click.argument("ref_b")
@path_option
@json_option
def diff(cache_dir: str | None, ref_a: str, ref_b: str, subdir: str, as_json: bool) -> None:
    """Paths added (A), removed (D) and modified (M) from REF_A to REF_B."""
    local = _cache(cache_dir)
    result = local.diff(local.resolve(ref_a, touch=False), local.resolve(ref_b, touch=False), path=subdir)
    if as_json:
        click.echo(json.dumps({"added": result.added, "removed": result.removed, "modified": result.modified}))
        return
    for mark, paths in (("A", result.added), ("D", result.removed), ("M", result.modified)):
        for path in paths:
            click.echo(f"{mark} {path}")


@cache.command(name="ls", cls=CasbahCommand)
@cache_dir_option
@json_option
def list_refs(cache_dir: str | None, as_json: bool) -> None:
    """Refs, most recently used first."""
    refs = _cache(cache_dir).list_refs()
    if as_json:
        click.echo(json.dumps([{"ref": name, "digest": str(digest), "hash": digest.hash, "size": digest.size,
                                "last_used": datetime.fromtimestamp(used, UTC).isoformat()}
                               for name, digest, used in refs]))
        return
    for name, digest, used in refs:
        click.echo(f"{datetime.fromtimestamp(used):%Y-%m-%d %H:%M:%S}  {digest}  {name}")


@cache.command(cls=CasbahCommand)
@cache_dir_option
@json_option
def size(cache_dir: str | None, as_json: bool) -> None:
    """Space the cache's objects take, with the configured quota."""
    local = _cache(cache_dir)
    objects = total = 0
    for _, _, n in local.store.all_objects():
        objects += 1
        total += n
    refs = len(local.list_refs())
    if as_json:
        click.echo(json.dumps({"bytes": total, "objects": objects, "refs": refs, "quota": local.quota}))
        return
    quota = f" (quota {humanize.size(local.quota)})" if local.quota is not None else ""
    click.echo(f"{humanize.size(total)} in {humanize.count(objects, 'object')}, {humanize.count(refs, 'ref')}{quota}")


@cache.command(cls=CasbahCommand)
@cache_dir_option
@click.argument("ref")
@click.argument("new_ref")
@click.option("--force", is_flag=True, help="Move NEW_REF if it names another tree already.")
def tag(cache_dir: str | None, ref: str, new_ref: str, force: bool) -> None:
    """Name REF's tree (a ref or HASH/SIZE) also NEW_REF."""
    local = _cache(cache_dir)
    digest = local.resolve(ref)
    current = local.get_ref(new_ref)
    if current is not None and current != digest and not force:
        raise click.ClickException(f"ref {new_ref!r} names {current} already (--force moves it)")
    local.set_ref(new_ref, digest, expected=current)  # compare-and-swap: a concurrent change is an error
    click.echo(f"{new_ref} -> {digest}", err=True)


@cache.command(cls=CasbahCommand)
@cache_dir_option
@click.argument("refs", nargs=-1, required=True)
def rm(cache_dir: str | None, refs: tuple[str, ...]) -> None:
    """Remove refs (objects stay until `prune`)."""
    local = _cache(cache_dir)
    for ref in refs:
        local.remove_ref(ref)
        click.echo(f"removed ref {ref}")


@cache.command(cls=CasbahCommand)
@cache_dir_option
def prune(cache_dir: str | None) -> None:
    """Delete every object no ref reaches."""
    report = _cache(cache_dir).prune()
    click.echo(f"removed {humanize.count(report.objects_removed, 'object')}, {humanize.size(report.bytes_removed)}")


@cache.command(cls=CasbahCommand)
@cache_dir_option
@click.option("--quota", metavar="SIZE", callback=_size_option,
              help="Target size, e.g. 10G (default: the client config's quota).")
def gc(cache_dir: str | None, quota: int | None) -> None:
    """Evict least recently used refs, then prune, until under SIZE."""
    local = _cache(cache_dir)
    if quota is None:
        quota = local.quota
    if quota is None:
        raise click.UsageError("no --quota given and no quota in the client config")
    report = local.gc(quota)
    for ref in report.refs_removed:
        click.echo(f"removed ref {ref}")
    click.echo(f"removed {humanize.count(len(report.refs_removed), 'ref')}, "
               f"{humanize.count(report.objects_removed, 'object')}, {humanize.size(report.bytes_removed)}")


@cache.command(cls=CasbahCommand)
@cache_dir_option
def fsck(cache_dir: str | None) -> None:
    """Re-hash every object, remove corrupt ones, and check every ref's tree is complete
    (exit 1 if anything was wrong)."""
    report = _cache(cache_dir).fsck()
    for digest in report.corrupt:
        click.echo(f"corrupt: {digest} (removed)")
    for name, absent in sorted(report.incomplete.items()):
        click.echo(f"incomplete: ref {name} lacks {len(absent)} objects, e.g. {absent[0]}")
    click.echo(f"{len(report.corrupt)} corrupt objects, {len(report.incomplete)} incomplete refs", err=True)
    if not report.clean:
        sys.exit(1)


@cache.command(name="push", cls=CasbahCommand)
@cache_dir_option
@remotes_options
@publish_option
@uri_option
@click.argument("ref")
def push_cmd(cache_dir: str | None, ref: str, publish: str, uri_template: str, **kwargs) -> None:
    """Upload REF's tree (only what each server lacks) to every push remote and publish
    its name; exit 1 if any remote failed (the others are still pushed)."""
    specs = specs_from(kwargs, for_push=True)
    results = push_all(_cache(cache_dir), specs, ref, publish, uri_template, show_progress=sys.stderr.isatty())
    for result in results:
        if result.summary is None:
            click.echo(f"Error: push to {describe(result.spec)} failed: {result.error}", err=True)
            continue
        if result.summary.warning:
            click.echo(f"warning: {result.summary.warning}", err=True)
        click.echo(f"{result.summary.line('pushed')} to {describe(result.spec)}", err=True)
    done = [r.summary for r in results if r.summary is not None]
    if done:
        click.echo(str(done[0].root))
    if len(done) < len(results):
        sys.exit(1)


@cache.command(name="pull", cls=CasbahCommand)
@cache_dir_option
@remotes_options
@publish_option
@uri_option
@click.argument("ref")
@click.option("--checkout", "dest", type=click.Path(file_okay=False), metavar="DIR",
              help="Then check the tree out into DIR (as `casbah cache checkout`).")
@external_links_option
def pull_cmd(cache_dir: str | None, ref: str, publish: str, uri_template: str, dest: str | None,
             allow_external_symlinks: bool, **kwargs) -> None:
    """Download REF (a ref name or HASH/SIZE) from the first remote that has it: only
    what the local cache lacks."""
    local = _cache(cache_dir)
    if dest is not None and os.path.isdir(dest) and os.listdir(dest):
        raise click.ClickException(f"checkout target {dest} is not empty")
    specs = specs_from(kwargs, for_push=False)
    result = pull_first(local, specs, ref, publish, uri_template, show_progress=sys.stderr.isatty())
    for spec, why in result.skipped:
        click.echo(f"note: {describe(spec)} did not serve {ref!r}: {why}", err=True)
    assert result.summary is not None and result.spec is not None
    click.echo(f"{result.summary.line('pulled')} from {describe(result.spec)}", err=True)
    _report_gc(local)
    if dest is not None:
        files = local.checkout(result.summary.root, dest, allow_external_symlinks=allow_external_symlinks)
        click.echo(f"checked out {humanize.count(files, 'file')} into {dest}", err=True)
    click.echo(str(result.summary.root))
