"""The object store of the local cache: content-addressed files under `objects/`.

    objects/<2 hex>/<sha256>   content, read-only; `<sha256>.x` is the executable twin
    tmp/                        writes in progress (same file system: a rename is atomic)
    lock                        flock: shared while adding objects, exclusive while pruning

An object appears atomically (renamed into place from tmp/ once complete and
verified), so nobody sees a torn one; an object is written only when absent, so an
existing one is never rewritten.  The lock lets prune run beside commits and pulls
without deleting an object that was written but is not yet named by a ref.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from casbah.client.materialise import LINK_FALLBACK
from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, DigestMismatch, InvalidArgument, NotFound
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.streams import write_all

_READ = 1024 * 1024
FN = DigestFunction.SHA256
#: Files up to this size are read whole (one read, hashed, written only if new); larger
#: ones are hashed first and copied only if new.  Either way an unchanged file is never written.
_SMALL = 1024 * 1024


class ObjectStore:
    """Objects, the tmp/ directory and the cache lock of one cache root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        for d in (self.objects, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._objects = str(self.objects)
        self._tmp = str(self.tmp)
        self._tmp_prefix = f"{self._tmp}/{os.getpid()}-{os.urandom(6).hex()}-"
        self._tmp_counter = itertools.count()
        # All 256 fan-out directories up front: storing an object is then one rename, no mkdir.
        if not os.path.isdir(f"{self._objects}/ff"):
            for i in range(256):
                os.makedirs(f"{self._objects}/{i:02x}", exist_ok=True)
        self._lock_path = root / "lock"
        self._lock_path.touch(exist_ok=True)

    # -- locking -------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """The cache lock: shared by writers of objects and readers of trees, exclusive for prune."""
        with open(self._lock_path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- paths and presence --------------------------------------------------------

    def path(self, hash_hex: str) -> str:
        return f"{self._objects}/{hash_hex[:2]}/{hash_hex}"

    def has(self, digest: Digest) -> bool:
        return digest.size == 0 or os.path.exists(self.path(digest.hash))

    def missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return [d for d in digests if not self.has(d)]

    # -- writing -------------------------------------------------------------------

    def tmp_file(self, mode: int = 0o444) -> tuple[int, str]:
        """A new file in tmp/ (named without a syscall: a pull creates thousands)."""
        name = f"{self._tmp_prefix}{next(self._tmp_counter)}"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), name
        except FileExistsError:  # a forked child shares the prefix; start a new series
            self._tmp_prefix = f"{self._tmp}/{os.getpid()}-{os.urandom(6).hex()}-"
            return self.tmp_file(mode)

    def _install(self, tmp: str, digest: Digest) -> None:
        """Move a verified temporary file into place (one atomic rename).

        Callers check first that the object is absent, so an object is only ever
        replaced when two writers race on the same blob, and then by identical bytes.
        """
        os.rename(tmp, self.path(digest.hash))

    @contextlib.contextmanager
    def new_object(self, digest: Digest) -> Iterator[int]:
        """A temporary file to write `digest`'s bytes into (the fd is yielded); installed as
        the object when the block ends normally, removed if it raises."""
        fd, tmp = self.tmp_file()
        try:
            yield fd
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        if digest.size:
            self._install(tmp, digest)
        else:
            os.unlink(tmp)

    def write_object(self, digest: Digest, data: bytes | memoryview) -> None:
        with self.new_object(digest) as fd:
            write_all(fd, data)

    def add_bytes(self, data: bytes) -> Digest:
        digest = Digest.of(data, FN)
        if not self.has(digest):
            self.write_object(digest, data)
        return digest

    def add_verified(self, digest: Digest, data: bytes) -> None:
        """Store a blob whose content the caller has already checked against `digest`."""
        if digest.size and not os.path.exists(self.path(digest.hash)):
            self.write_object(digest, data)

    def add_stream(self, digest: Digest, chunks: Iterable[bytes], verify: bool = True) -> None:
        """Store a downloaded blob, verified before it becomes visible (`verify=False`
        when the chunks come from a source that raises on a mismatch at the end)."""
        h = hashlib.sha256() if verify else None
        size = 0
        with self.new_object(digest) as fd:
            for chunk in chunks:
                if h is not None:
                    h.update(chunk)
                size += len(chunk)
                write_all(fd, chunk)
            if size != digest.size or (h is not None and h.hexdigest() != digest.hash):
                raise DigestMismatch(f"download of {digest} got {h.hexdigest() if h else '?'}/{size}")

    def add_file(self, path: str | os.PathLike, link: bool = False) -> Digest:
        """Store a file and return its digest; an object that exists already is not written.

        `link=True` hard-links the file itself into the cache when it is new (no
        copy): only for files nobody will modify afterwards, since the object and
        the file are then the same inode; the file is made read-only.  Executable
        files are copied anyway (the object must not carry an executable mode).
        """
        path = os.fspath(path)
        with open(path, "rb", buffering=0) as src:
            st = os.fstat(src.fileno())
            if st.st_size <= _SMALL:
                data = src.read()  # to EOF: the digest always names exactly the bytes stored
                digest = Digest(hashlib.sha256(data).hexdigest(), len(data), FN)
                if digest.size and not os.path.exists(self.path(digest.hash)):
                    if not (link and self._link_in(path, st, digest)):
                        self.write_object(digest, data)
                return digest
            digest = hash_fileobj(src)
            if os.path.exists(self.path(digest.hash)):
                return digest
            if link and self._link_in(path, st, digest):
                return digest
            src.seek(0)
            self._copy_in(src, digest, path)
        return digest

    def _link_in(self, path: str, st: os.stat_result, digest: Digest) -> bool:
        """Make `path` itself the object (read-only); False when that is not possible."""
        if st.st_mode & 0o111:
            return False
        try:
            os.link(path, self.path(digest.hash))
        except FileExistsError:
            return True
        except OSError as exc:
            if exc.errno in LINK_FALLBACK:
                return False  # nothing changed: the caller copies
            raise
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o444)  # the file and the object are one inode now
        return True

    def _copy_in(self, src: BinaryIO, digest: Digest, path: str) -> None:
        """Copy an open file into the cache, re-hashing it: a file modified since it was
        hashed must not be stored under the old digest."""
        h = hashlib.sha256()
        size = 0
        with self.new_object(digest) as fd:
            while chunk := src.read(_READ):
                h.update(chunk)
                size += len(chunk)
                write_all(fd, chunk)
            if size != digest.size or h.hexdigest() != digest.hash:
                raise InvalidArgument(f"{path} changed while being stored")

    def executable_twin(self, digest: Digest) -> str:
        """`<hash>.x`, a mode-0555 copy of the object (made on first use): a mode is per
        inode, so an executable hard-linked out of the cache needs an inode of its own."""
        twin = self.path(digest.hash) + ".x"
        if not os.path.exists(twin):
            fd, tmp = self.tmp_file()
            os.close(fd)
            try:
                shutil.copyfile(self.path(digest.hash), tmp)
                os.chmod(tmp, 0o555)
                os.link(tmp, twin)
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise BlobNotFound(digest, f"not in local cache {self.root}") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return twin

    # -- reading -------------------------------------------------------------------

    def read_bytes(self, digest: Digest) -> bytes:
        if digest.size == 0:
            return b""
        try:
            with open(self.path(digest.hash), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BlobNotFound(digest, f"not in local cache {self.root}") from None

    def directory(self, digest: Digest) -> re_pb2.Directory:
        return re_pb2.Directory.FromString(self.read_bytes(digest))

    def walk(self, root: Digest, missing_ok: bool = False) -> Iterator[tuple[str, re_pb2.Directory]]:
        """(relative path, Directory) for every directory of a tree, parents first."""
        stack = [("", root)]
        while stack:
            prefix, digest = stack.pop()
            try:
                directory = self.directory(digest)
            except BlobNotFound:
                if missing_ok:
                    continue
                raise
            yield prefix, directory
            for node in reversed(directory.directories):
                stack.append((f"{prefix}{node.name}/", Digest(node.digest.hash, node.digest.size_bytes)))

    def tree_digests(self, root: Digest, missing_ok: bool = False) -> set[Digest]:
        """Every object a tree needs: its Directory messages and its files."""
        needed = {root}
        for _, directory in self.walk(root, missing_ok=missing_ok):
            needed.update(Digest(n.digest.hash, n.digest.size_bytes) for n in directory.directories)
            needed.update(Digest(n.digest.hash, n.digest.size_bytes) for n in directory.files)
        return {d for d in needed if d.size}

    def subtree(self, root: Digest, path: str, missing_ok: bool = False) -> Digest | None:
        """The digest of directory `path` (`a/b`, relative) inside tree `root`; NotFound if
        the tree has no such directory (None with `missing_ok`)."""
        digest = root
        for part in [p for p in path.strip("/").split("/") if p not in ("", ".")]:
            if part == "..":
                raise InvalidArgument(f"--path {path!r}: '..' is not allowed")
            node = next((n for n in self.directory(digest).directories if n.name == part), None)
            if node is None:
                if missing_ok:
                    return None
                raise NotFound(f"no directory {path!r} in tree {root}")
            digest = Digest(node.digest.hash, node.digest.size_bytes)
        return digest

    def all_objects(self) -> Iterator[tuple[str, str | None, int]]:
        """(path, hash or None for a stray file, size) of every object file (twins included)."""
        for prefix in os.scandir(self.objects):
            if not prefix.is_dir():
                continue
            for entry in os.scandir(prefix.path):
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                name = entry.name.removesuffix(".x")
                yield entry.path, (name if len(name) == 64 else None), size


def hash_fileobj(f: BinaryIO) -> Digest:
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(_READ):
        h.update(chunk)
        size += len(chunk)
    return Digest(h.hexdigest(), size, FN)
