"""`casbah cas …`: single blobs and trees on a server, no local cache involved."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from google.protobuf.message import DecodeError

from casbah import humanize
from casbah.cli.asset import remote_options, spec_from
from casbah.cli.cache import CasbahCommand, external_links_option
from casbah.client.download import download_file
from casbah.client.remote import RemoteClient
from casbah.client.sync import TransferBar, download_tree
from casbah.digest import Digest, DigestFunction
from casbah.errors import CasbahError
from casbah.local import LocalCache
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.tree import build_tree, hash_file


@click.group()
def cas() -> None:
    """Blobs and trees on a REAPI server."""


@cas.command(cls=CasbahCommand)
@remote_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def upload(paths: tuple[str, ...], **kwargs) -> None:
    """Upload files (printing HASH/SIZE PATH) and directories (as trees; the root digest).

    Only what the server lacks is sent; a progress bar shows it on a terminal."""
    show = sys.stderr.isatty()
    with RemoteClient(spec_from(kwargs)) as client:
        for path in paths:
            p = Path(path)
            if p.is_dir():
                build = build_tree(p)
                blobs: dict[Digest, bytes | Path] = {**build.directories, **build.files}
                root = build.root
            else:
                root = hash_file(p, DigestFunction.SHA256)
                blobs = {root: p}
            missing = set(client.find_missing(blobs))
            with TransferBar(f"upload {path}", sum(d.size for d in missing), show) as bar:
                client.upload({d: s for d, s in blobs.items() if d in missing}, bar.advance)
            click.echo(f"{root} {path}")


def _is_directory(client: RemoteClient, digest: Digest) -> bool:
    """Heuristic: a blob is a tree root if it parses as a non-empty Directory whose
    canonical serialization is exactly the blob (arbitrary bytes practically never are)."""
    if digest.size == 0 or digest.size > 4 * 1024 * 1024:
        return False
    data = client.read_bytes(digest)
    try:
        directory = re_pb2.Directory.FromString(data)
    except DecodeError:
        return False
    if not (directory.files or directory.directories or directory.symlinks):
        return False
    return directory.SerializeToString(deterministic=True) == data


@cas.command(cls=CasbahCommand)
@remote_options
@click.argument("digest")
@click.option("-o", "--output", required=True, type=click.Path(), help="File (blob) or directory (tree) to write.")
@click.option("--tree/--blob", "as_tree", default=None, help="Force how DIGEST is treated (default: detect).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="A local cache whose objects a large blob's chunks are taken from (and kept in).")
@external_links_option
def download(digest: str, output: str, as_tree: bool | None, cache_dir: str | None, allow_external_symlinks: bool,
             **kwargs) -> None:
    """Download a blob to a file, or a Directory digest as a whole tree.

    A large blob on a server that splits blobs reuses the chunks of the file already at
    OUTPUT (an older version) and of --cache, and fetches only the others."""
    d = Digest.parse(digest)
    with RemoteClient(spec_from(kwargs)) as client:
        tree = _is_directory(client, d) if as_tree is None else as_tree
        if not tree:
            cache = LocalCache(os.path.expanduser(cache_dir)) if cache_dir else None
            with TransferBar(f"download {d.hash[:12]}…", d.size, sys.stderr.isatty()) as bar:
                received = download_file(client, d, output, cache, lambda n: bar.advance(0, n))
            click.echo(f"{d} -> {output} ({humanize.size(d.size)}, {humanize.size(received)} received)", err=True)
            return
        summary = download_tree(client, d, output, show_progress=sys.stderr.isatty(),
                                allow_external_symlinks=allow_external_symlinks)
    click.echo(summary.line("downloaded"), err=True)


@cas.command(cls=CasbahCommand)
@remote_options
@click.argument("digest")
def tree(digest: str, **kwargs) -> None:
    """List a tree: one line per file (digest, mode, path), directory and symlink."""
    root = Digest.parse(digest)
    with RemoteClient(spec_from(kwargs)) as client:
        directories = {d: re_pb2.Directory.FromString(data) for d, data in client.get_tree(root).items()}
    stack = [("", root)]
    while stack:
        prefix, d = stack.pop()
        directory = directories.get(d)
        if directory is None:
            click.echo(f"{'?':>72}  {prefix or '.'}/ (missing on server)")
            continue
        for file in directory.files:
            mode = "x" if file.is_executable else "-"
            click.echo(f"{file.digest.hash}/{file.digest.size_bytes} {mode} {prefix}{file.name}")
        for link in directory.symlinks:
            click.echo(f"{'symlink':>72} l {prefix}{link.name} -> {link.target}")
        for node in reversed(directory.directories):
            click.echo(f"{node.digest.hash}/{node.digest.size_bytes} d {prefix}{node.name}/")
            stack.append((f"{prefix}{node.name}/", Digest(node.digest.hash, node.digest.size_bytes)))


@cas.command(cls=CasbahCommand)
@remote_options
@click.argument("digests", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True,
              help='Print {"missing": [...], "present": [...]} (digests as HASH/SIZE) instead of lines.')
def missing(digests: tuple[str, ...], as_json: bool, **kwargs) -> None:
    """Print the DIGESTS the server lacks (exit 1 if any)."""
    try:
        wanted = [Digest.parse(d) for d in digests]
    except CasbahError as exc:
        raise click.BadParameter(str(exc)) from None
    with RemoteClient(spec_from(kwargs)) as client:
        absent = client.find_missing(wanted)
    if as_json:
        lacking = set(absent)
        click.echo(json.dumps({"missing": [str(d) for d in dict.fromkeys(absent)],
                               "present": [str(d) for d in dict.fromkeys(wanted) if d not in lacking]}))
    else:
        for d in absent:
            click.echo(str(d))
    if absent:
        sys.exit(1)
