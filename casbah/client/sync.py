"""Push and pull trees and refs between a local cache and a REAPI server.

Push sends only what FindMissingBlobs says the server lacks, then publishes the
ref's name: as a Remote Asset directory (`urn:casbah:ref:<name>` by default) or
through BuildStream's ReferenceStorage.  A server with neither (BuildGrid 0.9.1)
still gets the tree; the name is skipped with a warning.  Pull fetches only the
objects the local cache lacks.  Both show a progress bar on a terminal and end
with a summary.  `download_tree` writes a server's tree straight into a
directory, without a local cache (`casbah cas download`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from casbah import humanize
from casbah.client.materialise import Materialiser, copy_fd, plan_tree
from casbah.client.remote import RemoteClient, Source
from casbah.digest import Digest
from casbah.errors import AssetNotFound, BlobNotFound, InvalidArgument, Unsupported
from casbah.local import LocalCache
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.streams import write_all
from casbah.tree import first_missing_directory

log = logging.getLogger(__name__)

DEFAULT_URI_TEMPLATE = "urn:casbah:ref:{ref}"
PUBLISH_MODES = ("asset", "references", "none")


@dataclass
class SyncSummary:
    root: Digest
    files: int = 0
    total_bytes: int = 0
    blobs_sent: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    published: str = ""
    warning: str = ""

    def line(self, verb: str) -> str:
        return (f"{verb} {self.root}: {humanize.count(self.files, 'file')}, {humanize.size(self.total_bytes)}; "
                f"transferred {humanize.count(self.blobs_sent, 'blob')}, {humanize.size(self.bytes_sent)} in "
                f"{humanize.duration(self.seconds)} ({humanize.rate(self.bytes_sent, self.seconds)})")


class TransferBar:
    """A rich progress bar on a terminal; nothing otherwise (rich is imported only then)."""

    def __init__(self, description: str, total: int, show: bool) -> None:
        self._progress = None
        self.advance: Callable[[int, int], None] = lambda blobs, nbytes: None
        if not show or total == 0:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        # Sizes and rates in casbah's own units (the summary line's), not rich's decimal MB.
        sizes = TextColumn("{task.fields[done_text]} of {task.fields[total_text]}")
        speed = TextColumn("{task.fields[rate_text]}")
        progress = Progress(TextColumn("{task.description}"), BarColumn(), sizes, speed, TimeRemainingColumn(),
                            transient=True)
        started = time.monotonic()
        task = progress.add_task(description, total=total, done_text=humanize.size(0),
                                 total_text=humanize.size(total), rate_text="")
        done = 0

        def advance(blobs: int, nbytes: int) -> None:
            nonlocal done
            done += nbytes
            progress.update(task, advance=nbytes, done_text=humanize.size(done),
                            rate_text=humanize.rate(done, time.monotonic() - started))

        progress.start()
        self._progress = progress
        self.advance = advance

    def __enter__(self) -> TransferBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _file_stats(cache: LocalCache, root: Digest) -> tuple[int, int]:
    files = total = 0
    for _, directory in cache.walk(root):
        files += len(directory.files)
        total += sum(n.digest.size_bytes for n in directory.files)
    return files, total


def _is_digest(name: str) -> bool:
    head, _, tail = name.rpartition("/")
    return len(head) == 64 and tail.isdigit()


def push(cache: LocalCache, client: RemoteClient, name: str, publish: str = "asset",
         uri_template: str = DEFAULT_URI_TEMPLATE, show_progress: bool = False) -> SyncSummary:
    started = time.monotonic()
    root = cache.resolve(name)
    summary = SyncSummary(root)
    summary.files, summary.total_bytes = _file_stats(cache, root)
    client.check_writable()  # a read-only server is refused before any blob is sent
    needed = cache.tree_digests(root)
    missing = client.find_missing(needed)
    absent = cache.missing(missing)
    if absent:
        raise BlobNotFound(min(absent), f"{name}: {len(absent)} objects of the tree are missing from the local "
                                        f"cache {cache.root} (run `casbah cache fsck`)")
    sources: dict[Digest, Source] = {d: cache.object_path(d) for d in missing}
    before = client.uploaded.bytes
    with TransferBar(f"push {name}", sum(d.size for d in missing), show_progress) as bar:
        client.upload(sources, bar.advance)
    summary.blobs_sent = len(missing)
    summary.bytes_sent = client.uploaded.bytes - before  # chunked uploads send only missing chunks
    is_ref = name != str(root)
    if is_ref and publish != "none":
        try:
            if publish == "asset":
                uri = uri_template.format(ref=name)
                client.push_directory([uri], root)
                summary.published = uri
            else:
                client.update_reference([name], root)
                summary.published = f"reference {name}"
        except Unsupported:
            service = "Remote Asset" if publish == "asset" else "ReferenceStorage"
            summary.warning = (f"{client.spec.url} has no {service} service: the tree was pushed but the name "
                               f"{name!r} was not published (pull it by digest: {root})")
            log.debug(summary.warning)
    summary.seconds = time.monotonic() - started
    return summary


def resolve_remote(client: RemoteClient, name: str, publish: str = "asset",
                   uri_template: str = DEFAULT_URI_TEMPLATE) -> Digest:
    """A digest (`HASH/SIZE`) as is, or a ref name looked up on the server: the way
    `publish` names first, then the other (a ref pushed as a Remote Asset is found by
    a ReferenceStorage pull and back), so pullers need not know how it was pushed."""
    if _is_digest(name):
        return Digest.parse(name)
    uri = uri_template.format(ref=name)
    lookups: list[Callable[[], Digest]] = [lambda: client.fetch_directory([uri]), lambda: client.get_reference(name)]
    if publish == "references":
        lookups.reverse()
    unsupported = 0
    for lookup in lookups:
        try:
            return lookup()
        except Unsupported:
            unsupported += 1
        except AssetNotFound:
            pass
    if unsupported == len(lookups):
        raise Unsupported(f"{client.spec.url} serves neither Remote Asset nor ReferenceStorage, so ref names "
                          f"cannot be looked up there: pull by digest (HASH/SIZE) instead of {name!r}")
    raise AssetNotFound(f"{client.spec.url} has no ref {name!r} (neither Remote Asset {uri} nor "
                        f"ReferenceStorage key {name!r})")


def fetch_directories(client: RemoteClient, root: Digest) -> dict[Digest, bytes]:
    """Every Directory of the tree at `root` from the server, checked complete: GetTree
    silently leaves out missing subtrees, and a partial tree must not be taken for a whole."""
    if not root.size:
        return {root: b""}
    directories = client.get_tree(root)
    missing = first_missing_directory(root, directories)
    if missing == root:
        raise BlobNotFound(root, f"tree root not on {client.spec.url}")
    if missing is not None:
        raise BlobNotFound(missing, f"directory of the tree {root} is missing on {client.spec.url}")
    return directories


def _files_of(directories: dict[Digest, bytes]) -> set[Digest]:
    files: set[Digest] = set()
    for data in directories.values():
        for node in re_pb2.Directory.FromString(data).files:
            if node.digest.size_bytes:
                files.add(Digest(node.digest.hash, node.digest.size_bytes))
    return files


def _complete_locally(cache: LocalCache, root: Digest) -> bool:
    try:
        return not cache.missing(cache.tree_digests(root))
    except BlobNotFound:
        return False


def pull(cache: LocalCache, client: RemoteClient, name: str, publish: str = "asset",
         uri_template: str = DEFAULT_URI_TEMPLATE, show_progress: bool = False,
         local_ref: str | None = None) -> SyncSummary:
    started = time.monotonic()
    root = resolve_remote(client, name, publish, uri_template)
    summary = SyncSummary(root)
    with cache.adding():
        if not _complete_locally(cache, root):
            directories = fetch_directories(client, root)
            new_dirs = 0
            for digest, data in directories.items():
                if digest.size and not cache.has(digest):
                    cache.add_verified(digest, data)  # get_tree keys each message by its own hash
                    new_dirs += 1
            missing = cache.missing(sorted(_files_of(directories)))
            with TransferBar(f"pull {name}", sum(d.size for d in missing), show_progress) as bar:
                # The client verifies every blob before its last chunk reaches the sink.
                before = client.downloaded.bytes
                # Large blobs come as the chunks the cache lacks, kept in it for the next version.
                client.download(missing, lambda d, chunks: cache.add_stream(d, chunks, verify=False), bar.advance,
                                chunks=cache)
            summary.blobs_sent = len(missing) + new_dirs
            summary.bytes_sent = client.downloaded.bytes - before
        summary.files, summary.total_bytes = _file_stats(cache, root)
        ref = local_ref if local_ref is not None else (name if not _is_digest(name) else None)
        if ref is not None:
            cache.set_ref(ref, root)
    cache.enforce_quota(root)  # outside the shared lock: prune takes it exclusively
    summary.seconds = time.monotonic() - started
    return summary


def download_tree(client: RemoteClient, root: Digest, dest: str | os.PathLike,
                  show_progress: bool = False, allow_external_symlinks: bool = False) -> SyncSummary:
    """Write the tree at `root` into `dest` (created; must be empty) straight from the
    server: each distinct blob is downloaded once, written to its first path, and copied
    to the others.  Files get 0644/0755 modes.  The tree is checked whole before anything
    is written, and a failed download leaves nothing behind (`casbah.client.materialise`)."""
    started = time.monotonic()
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument(f"download target {out} exists and is not an empty directory")
    directories = fetch_directories(client, root)
    plan = plan_tree(root, lambda d: re_pb2.Directory.FromString(directories[d]), allow_external_symlinks)
    summary = SyncSummary(root)
    where: dict[Digest, list[tuple[int, str, int]]] = {}
    empty: list[tuple[int, str, int]] = []
    for index, name, digest, executable in plan.files:
        target = (index, name, 0o755 if executable else 0o644)
        summary.files += 1
        summary.total_bytes += digest.size
        if digest.size:
            where.setdefault(digest, []).append(target)
        else:
            empty.append(target)

    with Materialiser(plan, out) as tree:
        def sink(digest: Digest, chunks: Iterator[bytes]) -> None:
            (index, name, mode), *others = where[digest]
            fd = tree.new_file(index, name, mode)
            try:
                for chunk in chunks:
                    write_all(fd, chunk)
                for index, name, mode in others:
                    copy = tree.new_file(index, name, mode)
                    try:
                        copy_fd(fd, copy)
                    finally:
                        os.close(copy)
            finally:
                os.close(fd)

        with TransferBar(f"download {root}", sum(d.size for d in where), show_progress) as bar:
            client.download(list(where), sink, bar.advance)
        for index, name, mode in empty:
            os.close(tree.new_file(index, name, mode))
    summary.blobs_sent = len(where) + sum(1 for d in directories if d.size)
    summary.bytes_sent = sum(d.size for d in where)
    summary.seconds = time.monotonic() - started
    return summary


