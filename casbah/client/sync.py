"""Push and pull trees and refs between a local cache and a REAPI server.

Push sends only what FindMissingBlobs says the server lacks, then publishes the
ref's name: as a Remote Asset directory (`urn:casbah:ref:<name>` by default) or
through BuildStream's ReferenceStorage.  A server with neither (BuildGrid 0.9.1)
still gets the tree; the name is skipped with a warning.  Pull fetches only the
objects the local cache lacks.  Both show a progress bar on a terminal and end
with a summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from casbah.client.cache import LocalCache
from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.errors import CasbahError, NotFound, Unsupported
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

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
        rate = self.bytes_sent / self.seconds / 1e6 if self.seconds else 0.0
        return (f"{verb} {self.root}: {self.files} files, {self.total_bytes} bytes; transferred "
                f"{self.blobs_sent} blobs, {self.bytes_sent} bytes in {self.seconds:.2f}s ({rate:.1f} MB/s)")


def _progress(description: str, total: int, show: bool) -> tuple[Progress | None, Callable[[int, int], None]]:
    if not show or total == 0:
        return None, lambda blobs, nbytes: None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), transient=True)
    task = progress.add_task(description, total=total)
    progress.start()
    return progress, lambda blobs, nbytes: progress.update(task, advance=nbytes)


def _file_stats(cache: LocalCache, root: Digest) -> tuple[int, int]:
    files = total = 0
    for _, directory in cache.walk(root):
        files += len(directory.files)
        total += sum(n.digest.size_bytes for n in directory.files)
    return files, total


def push(cache: LocalCache, client: RemoteClient, name: str, publish: str = "asset",
         uri_template: str = DEFAULT_URI_TEMPLATE, show_progress: bool = False) -> SyncSummary:
    started = time.monotonic()
    root = cache.resolve(name)
    summary = SyncSummary(root)
    summary.files, summary.total_bytes = _file_stats(cache, root)
    missing = client.find_missing(cache.tree_digests(root))
    sources = {d: cache.object_path(d) for d in missing}
    progress, advance = _progress(f"push {name}", sum(d.size for d in missing), show_progress)
    try:
        client.upload(sources, advance)
    finally:
        if progress is not None:
            progress.stop()
    summary.blobs_sent = len(missing)
    summary.bytes_sent = sum(d.size for d in missing)
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
            summary.warning = (f"{client.spec.url} has no {service} service: "
                               f"the tree was pushed but the name {name!r} was not published")
            log.warning(summary.warning)
    summary.seconds = time.monotonic() - started
    return summary


def resolve_remote(client: RemoteClient, name: str, publish: str = "asset",
                   uri_template: str = DEFAULT_URI_TEMPLATE) -> Digest:
    """A digest (`HASH/SIZE`) as is, or a ref name looked up on the server."""
    head, _, tail = name.rpartition("/")
    if len(head) == 64 and tail.isdigit():
        return Digest.parse(name)
    digest = None
    if publish == "references":
        digest = client.get_reference(name)
    else:
        try:
            digest = client.fetch_directory([uri_template.format(ref=name)])
        except Unsupported:
            digest = client.get_reference(name)
    if digest is None:
        raise NotFound(f"{client.spec.url} has no ref {name!r}")
    return digest


def pull(cache: LocalCache, client: RemoteClient, name: str, publish: str = "asset",
         uri_template: str = DEFAULT_URI_TEMPLATE, show_progress: bool = False,
         local_ref: str | None = None) -> SyncSummary:
    started = time.monotonic()
    root = resolve_remote(client, name, publish, uri_template)
    summary = SyncSummary(root)
    with cache.adding():
        directories = client.get_tree(root) if root.size else {root: b""}
        for digest, data in directories.items():
            if digest.size and not cache.has(digest):
                if cache.add_bytes(data) != digest:
                    raise CasbahError(f"server sent a Directory that does not hash to {digest}")
        files: set[Digest] = set()
        for data in directories.values():
            directory = re_pb2.Directory.FromString(data)
            for node in directory.files:
                if node.digest.size_bytes:
                    files.add(Digest(node.digest.hash, node.digest.size_bytes))
        missing = cache.missing(sorted(files))
        progress, advance = _progress(f"pull {name}", sum(d.size for d in missing), show_progress)
        try:
            client.download(missing, cache.add_stream, advance)
        finally:
            if progress is not None:
                progress.stop()
        summary.blobs_sent = len(missing) + sum(1 for d in directories if d.size)
        summary.bytes_sent = sum(d.size for d in missing)
        summary.files, summary.total_bytes = _file_stats(cache, root)
        ref = local_ref if local_ref is not None else (name if name != str(root) else None)
        if ref is not None:
            cache.set_ref(ref, root)
    summary.seconds = time.monotonic() - started
    return summary
