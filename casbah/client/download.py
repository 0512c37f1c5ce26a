"""A blob downloaded to a plain file (`casbah cas download`), rsync-like for large blobs.

When the server splits blobs (SplitBlob) and the blob is large enough to be chunked,
the file is built from its chunk list: a chunk found in the file already at the
destination (an older version, cut with the *server's* FastCDC parameters so both
sides cut at the same places) or in a local cache (`--cache`) is copied from there;
only the other chunks are fetched, in groups of bounded size, so a 256 MiB file
changed in one place costs the chunks around the change.  Fetched chunks are also
added to that cache (as unnamed objects, until `cache prune`), so the next version
shares them.  Otherwise the blob is streamed whole over ByteStream, as before.

Either way the new file is written beside the destination and renamed over it only
after the whole blob verified against its digest: a reader of the destination sees
the old file or the new one, never a mix, and a failure leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from casbah.cdc import cut_file
from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.errors import BlobNotFound
from casbah.local import LocalCache
from casbah.reapi import chunked
from casbah.streams import ReadVerifier

#: Chunk bytes fetched per BatchReadBlobs round (bounded memory).
FETCH_GROUP = 8 << 20

Progress = Callable[[int], None]  # bytes of the blob just written


def download_file(client: RemoteClient, digest: Digest, output: str | os.PathLike, cache: LocalCache | None = None,
                  progress: Progress | None = None) -> int:
    """Write blob `digest` to `output`; the bytes received from the server."""
    out = Path(output)
    tmp = out.with_name(out.name + ".casbah-tmp")
    try:
        parts = client.run(chunked.split(client.client, digest))
        if parts is None:
            received = _whole(client, digest, tmp, progress)
        else:
            received = _by_chunks(client, digest, parts, out, tmp, cache, progress)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, out)
    return received


def _whole(client: RemoteClient, digest: Digest, tmp: Path, progress: Progress | None) -> int:
    with open(tmp, "wb") as f:
        for piece in client.read_stream(digest):
            f.write(piece)
            if progress:
                progress(len(piece))
    return digest.size


def _by_chunks(client: RemoteClient, digest: Digest, parts: list[Digest], out: Path, tmp: Path,
               cache: LocalCache | None, progress: Progress | None) -> int:
    params = client.run(client.client.capabilities()).cdc
    local: dict[Digest, tuple[Path, int]] = {}
    if params is not None and out.is_file():
        for cut in cut_file(out, params, digest.function):
            local.setdefault(cut.digest, (out, cut.offset))
    if cache is not None:
        for chunk in dict.fromkeys(parts):
            if chunk not in local and cache.has(chunk):
                local[chunk] = (cache.object_path(chunk), 0)
    wanted = [c for c in dict.fromkeys(parts) if c not in local]
    fetched: dict[Digest, bytes] = {}
    verifier = ReadVerifier(digest, f"{client.spec.url} (chunks of the blob, and local copies of some)")
    received = position = 0
    files: dict[Path, BinaryIO] = {}
    with open(tmp, "w+b") as f, contextlib.ExitStack() as opened:
        for chunk in parts:
            if chunk in local:
                path, offset = local[chunk]
                if path == tmp:
                    f.flush()
                if path not in files:
                    files[path] = opened.enter_context(open(path, "rb"))
                source = files[path]
                source.seek(offset)
                data = source.read(chunk.size)
            else:
                if chunk not in fetched:  # the next wanted chunk, in order: fetch a group from it
                    start = wanted.index(chunk)
                    group, size = _group(wanted, start)
                    fetched.update(_fetch(client, group, cache))
                    received += size
                data = fetched.pop(chunk)
                local[chunk] = (tmp, position)  # a repeat is copied from what was written
            verifier.update(data)
            f.write(data)
            position += len(data)
            if progress:
                progress(len(data))
        verifier.finish()
    return received


def _group(wanted: list[Digest], start: int) -> tuple[list[Digest], int]:
    group: list[Digest] = []
    size = 0
    for chunk in wanted[start:]:
        if group and size + chunk.size > FETCH_GROUP:
            break
        group.append(chunk)
        size += chunk.size
    return group, size


def _fetch(client: RemoteClient, group: list[Digest], cache: LocalCache | None) -> dict[Digest, bytes]:
    found, lost = client.run(client.client.read_many(group, True, client.spec.url))
    if lost:
        raise next(iter(lost.values()))
    for chunk in group:
        if chunk not in found:
            raise BlobNotFound(chunk, f"chunk of a split blob, not on {client.spec.url}")
    if cache is not None:
        with cache.adding():
            for chunk in group:
                cache.add_verified(chunk, found[chunk])
    client.downloaded.add(len(group), sum(c.size for c in group))
    return found
