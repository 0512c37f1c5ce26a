"""`casbah source …`: fetch sources through the Remote Asset cache, by policy."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import click
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from casbah import humanize
from casbah.cli.asset import remote_options, spec_from
from casbah.cli.cache import DEFAULT_CACHE_DIR, CasbahCommand, external_links_option
from casbah.client.remote import RemoteClient
from casbah.client.source_cache import FETCH_POLICIES, PUSH_POLICIES, FetchSummary, RemotePolicy, SourceCache
from casbah.client.sources import KINDS, Source, expand_aliases
from casbah.config import ConfigError, expand_env, format_validation_error
from casbah.errors import CasbahError, InvalidArgument
from casbah.local import LocalCache
from casbah.reapi.channel import RemoteSpec


def _source_options(fn):
    options = [
        click.option("--kind", type=click.Choice(KINDS), required=True),
        click.option("--uri", "uris", multiple=True, required=True, help="Origin URL (repeat for mirrors)."),
        click.option("--ref", help="git: the commit (40 hex)."),
        click.option("--branch", help="git: the branch (pushed as vcs.branch)."),
        click.option("--sha256", help="tar/zip/file: the expected sha256 (hex)."),
        click.option("--with-git-dir", is_flag=True, help="git: keep .git in the staged tree."),
        click.option("--filename", help="file: the name to stage it under (default: the URI's last segment)."),
        click.option("--cache-dir", envvar="CASBAH_CACHE_DIR", default=DEFAULT_CACHE_DIR, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _source(kind: str, uris: tuple[str, ...], ref: str | None, branch: str | None, sha256: str | None,
            with_git_dir: bool, filename: str | None) -> Source:
    return Source(kind=kind, uris=list(uris), ref=ref, branch=branch, sha256=sha256, keep_git_dir=with_git_dir,
                  filename=filename)


@click.group()
def source() -> None:
    """Sources (git, tar, zip, file, local) cached through the Remote Asset API."""


@source.command(cls=CasbahCommand)
@_source_options
@remote_options(required=False)
@click.option("--asset-fetch", type=click.Choice(FETCH_POLICIES), default="fallback", show_default=True,
              help="off: always native; fallback: the asset cache, else native; only: the asset cache or fail.")
@click.option("--asset-push", type=click.Choice(PUSH_POLICIES), default="off", show_default=True,
              help="on: push what a native fetch got (content, then the asset name).")
@external_links_option
@click.argument("dest", type=click.Path(file_okay=False))
def fetch(kind: str, uris: tuple[str, ...], ref: str | None, branch: str | None, sha256: str | None,
          with_git_dir: bool, filename: str | None, cache_dir: str, asset_fetch: str, asset_push: str, dest: str,
          allow_external_symlinks: bool, **kwargs) -> None:
    """Stage a source into DEST: from the asset cache or natively, as the policies say."""
    _logging()
    src = _source(kind, uris, ref, branch, sha256, with_git_dir, filename)
    local = LocalCache(Path(cache_dir).expanduser())
    if not kwargs.get("remote"):
        if asset_fetch != "off" or asset_push == "on":
            raise click.UsageError("--remote (or CASBAH_REMOTE) is needed unless --asset-fetch off --asset-push off")
        cache = SourceCache(local, [], allow_external_symlinks=allow_external_symlinks)
        with _working(f"fetching {src.name}"):
            root = cache.fetch(src, dest)
    else:
        with RemoteClient(spec_from(kwargs)) as client, _working(f"fetching {src.name}"):
            cache = SourceCache(local, [RemotePolicy(client, asset_fetch, asset_push)],
                                allow_external_symlinks=allow_external_symlinks)
            root = cache.fetch(src, dest)
    click.echo(f"{root} {dest}")
    click.echo(f"summary: {cache.summary.line()}", err=True)


@source.command(name="push", cls=CasbahCommand)
@_source_options
@remote_options
def push_cmd(kind: str, uris: tuple[str, ...], ref: str | None, branch: str | None, sha256: str | None,
             with_git_dir: bool, filename: str | None, cache_dir: str, **kwargs) -> None:
    """Fetch a source natively and push it to the asset cache (warms the cache)."""
    _logging()
    src = _source(kind, uris, ref, branch, sha256, with_git_dir, filename)
    with RemoteClient(spec_from(kwargs)) as client, tempfile.TemporaryDirectory() as tmp, \
            _working(f"fetching and pushing {src.name}"):
        # The stage is scratch, deleted unread: a link out of the tree there is harmless.
        cache = SourceCache(LocalCache(Path(cache_dir).expanduser()), [RemotePolicy(client, "off", "on")],
                            allow_external_symlinks=True)
        root = cache.fetch(src, Path(tmp) / "stage")
    click.echo(str(root))
    click.echo(f"summary: {cache.summary.line()}", err=True)
    if cache.summary.counts["pushed"] == 0:
        reason = "local sources are never cached" if not src.cacheable else "the push failed (see the warning above)"
        raise click.ClickException(f"nothing was pushed: {reason}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ManifestRemote(_Model):
    url: str
    instance: str = ""
    server_cert: str | None = Field(default=None, alias="server-cert")
    client_key: str | None = Field(default=None, alias="client-key")
    client_cert: str | None = Field(default=None, alias="client-cert")
    token_file: str | None = Field(default=None, alias="token-file")
    asset_fetch: str = Field(default="fallback", alias="asset-fetch", pattern="^(off|fallback|only)$")
    asset_push: str = Field(default="off", alias="asset-push", pattern="^(on|off)$")

    @field_validator("asset_fetch", "asset_push", mode="before")
    @classmethod
    def _yaml_boolean(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted `on`/`off` as a boolean: take it as the word meant."""
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class ManifestSource(_Model):
    kind: str
    url: str | None = None
    urls: list[str] = Field(default_factory=list)
    ref: str | None = None
    branch: str | None = None
    sha256: str | None = None
    filename: str | None = None
    directory: str | None = None
    with_git_dir: bool = Field(default=False, alias="with-git-dir")

    @field_validator("directory")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is not None:
            parts = PurePosixPath(value).parts
            if not parts or PurePosixPath(value).is_absolute() or ".." in parts:
                raise ValueError(f"{value!r} must be a relative path inside DEST (no '..')")
        return value


class Manifest(_Model):
    aliases: dict[str, list[str]] = Field(default_factory=dict)
    remotes: list[ManifestRemote] = Field(default_factory=list)
    sources: list[ManifestSource]


def load_manifest(path: str | Path) -> Manifest:
    try:
        raw: Any = expand_env(yaml.safe_load(Path(path).read_text()) or {})
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise click.ClickException(format_validation_error(exc, str(path))) from None
    except ConfigError as exc:
        raise click.ClickException(f"manifest {path}: {exc}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise click.ClickException(f"cannot read manifest {path}: {exc}") from None


def manifest_sources(spec: Manifest, dest: str | Path) -> list[tuple[Source, Path]]:
    """Every source of a manifest (aliases expanded) with the directory it is staged in."""
    sources: list[tuple[Source, Path]] = []
    seen: dict[Path, int] = {}
    for i, entry in enumerate(spec.sources):
        urls = [u for url in ([entry.url] if entry.url else []) + entry.urls for u in expand_aliases(url, spec.aliases)]
        try:
            src = Source(kind=entry.kind, uris=urls, ref=entry.ref, branch=entry.branch, sha256=entry.sha256,
                         keep_git_dir=entry.with_git_dir, filename=entry.filename)
        except CasbahError as exc:
            raise InvalidArgument(f"sources[{i}]: {exc}") from None
        target = Path(dest) / (entry.directory or f"{i:03d}-{src.name}")
        if target in seen:
            raise InvalidArgument(f"sources[{i}] and sources[{seen[target]}] are both staged in {target}")
        seen[target] = i
        sources.append((src, target))
    return sources


@dataclass
class FetchAllResult:
    summary: FetchSummary
    roots: dict[str, str] = field(default_factory=dict)  # staged directory -> tree digest
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def fetch_manifest(spec: Manifest, dest: str | Path, cache_dir: str | Path, jobs: int = 8,
                   asset_fetch: str | None = None, asset_push: str | None = None,
                   progress: Progress | None = None, allow_external_symlinks: bool = False) -> FetchAllResult:
    """Fetch every source of a manifest concurrently (what `fetch-all` runs; the benchmark too)."""
    started = time.monotonic()
    sources = manifest_sources(spec, dest)
    result = FetchAllResult(FetchSummary())
    with contextlib.ExitStack() as stack:
        remotes = []
        for r in spec.remotes:
            client = stack.enter_context(RemoteClient(RemoteSpec(
                url=r.url, instance=r.instance, server_cert=r.server_cert, client_key=r.client_key,
                client_cert=r.client_cert, token_file=r.token_file)))
            remotes.append(RemotePolicy(client, asset_fetch or r.asset_fetch, asset_push or r.asset_push))
        cache = SourceCache(LocalCache(Path(cache_dir).expanduser()), remotes, result.summary,
                            allow_external_symlinks)
        task = progress.add_task("sources", total=len(sources)) if progress is not None else None
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(cache.fetch, src, target, dest): (src, target) for src, target in sources}
            for future in as_completed(futures):
                src, target = futures[future]
                try:
                    result.roots[str(target)] = str(future.result())
                except CasbahError as exc:
                    result.failures.append(f"{src.name}: {exc}")
                if progress is not None and task is not None:
                    progress.advance(task)
    result.seconds = time.monotonic() - started
    return result


@source.command(name="fetch-all", cls=CasbahCommand)
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--cache-dir", envvar="CASBAH_CACHE_DIR", default=DEFAULT_CACHE_DIR, show_default=True)
@click.option("--jobs", "-j", default=8, show_default=True, type=click.IntRange(min=1),
              help="Sources fetched at once.")
@click.option("--asset-fetch", type=click.Choice(FETCH_POLICIES), help="Override every remote's asset-fetch.")
@click.option("--asset-push", type=click.Choice(PUSH_POLICIES), help="Override every remote's asset-push.")
@external_links_option
def fetch_all(manifest: str, dest: str, cache_dir: str, jobs: int, asset_fetch: str | None,
              asset_push: str | None, allow_external_symlinks: bool) -> None:
    """Fetch every source of MANIFEST into DEST/<directory>, concurrently."""
    _logging(quiet=True)
    spec = load_manifest(manifest)
    progress = Progress(TextColumn("fetching sources"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=not sys.stderr.isatty())
    with progress:
        result = fetch_manifest(spec, dest, cache_dir, jobs, asset_fetch, asset_push, progress,
                                allow_external_symlinks)
    for target, root in sorted(result.roots.items()):
        click.echo(f"{root} {target}")
    click.echo(f"summary: {humanize.count(len(spec.sources), 'source')} in {humanize.duration(result.seconds)}; "
               f"{result.summary.line()}", err=True)
    for failure in result.failures:
        click.echo(f"error: {failure}", err=True)
    if result.failures:
        sys.exit(1)


@contextlib.contextmanager
def _working(what: str) -> Iterator[None]:
    """A spinner with the elapsed time on a terminal while one source is fetched (its
    size is not known up front); nothing otherwise."""
    with Progress(SpinnerColumn(), TextColumn(what), TimeElapsedColumn(), transient=True,
                  disable=not sys.stderr.isatty()) as progress:
        progress.add_task(what, total=None)
        yield


def _logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
