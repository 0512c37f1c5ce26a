"""The local CAS cache: objects, named refs, commit/checkout/diff, prune, quota, fsck.

Layout (compatible in spirit with BuildStream's CASCache):

    objects/<2 hex>/<sha256>   content, read-only; `<sha256>.x` is the executable twin
    refs/<name>                 text `HASH/SIZE`; names may contain `/`; mtime = last use
    tmp/                        writes in progress (same filesystem: renames are atomic)
    lock                        flock: shared while adding objects, exclusive while pruning

Safe for several processes at once: objects and refs appear by atomic rename, so
nobody sees a torn one; and prune holds the lock exclusively, so it never deletes
an object a concurrent commit has written but not yet referenced.

Checkouts hard-link objects (they are read-only, so a build cannot corrupt the
cache through a checkout); executable files link the `.x` twin, because a mode is
per inode.  Where a hard link is impossible (another filesystem), or with
`copy=True`, files are copied.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, DigestMismatch, InvalidArgument, NotFound
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.tree import build_tree

_READ = 1024 * 1024
_FN = DigestFunction.SHA256
#: Files up to this size are read whole (one read, hashed, written only if new);
#: larger ones are hashed first and copied only if new, so an unchanged file is never written.
_SMALL = 1024 * 1024
#: Threads hashing and storing files in commit, and placing them in checkout: the work is
#: syscalls and hashing, which release the GIL, so a few threads overlap file-system latency.
IO_THREADS = min(8, (os.cpu_count() or 2) * 2)


@dataclass
class TreeDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)


@dataclass
class PruneReport:
    objects_removed: int = 0
    bytes_removed: int = 0
    refs_removed: list[str] = field(default_factory=list)


class LocalCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self.objects = self.root / "objects"
        self.refs = self.root / "refs"
        self.tmp = self.root / "tmp"
        for d in (self.objects, self.refs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / "lock"
        self._lock_path.touch(exist_ok=True)

    # -- locking -------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with open(self._lock_path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def adding(self) -> contextlib.AbstractContextManager[None]:
        """Hold while adding objects that no ref names yet (commit, pull)."""
        return self._locked(exclusive=False)

    # -- objects -------------------------------------------------------------------

    def object_path(self, digest: Digest) -> Path:
        return self.objects / digest.hash[:2] / digest.hash

    def has(self, digest: Digest) -> bool:
        return digest.size == 0 or self.object_path(digest).exists()

    def missing(self, digests: list[Digest]) -> list[Digest]:
        return [d for d in digests if not self.has(d)]

    def _tmp_file(self) -> tuple[int, str]:
        name = f"{self.tmp}/{os.getpid()}-{time.monotonic_ns()}-{os.urandom(4).hex()}"
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444), name

    def _install(self, tmp: str, digest: Digest) -> bool:
        """Move a verified temporary file into place; False if the object existed."""
        target = self.object_path(digest)
        if target.exists():
            os.unlink(tmp)
            return False
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)
        return True

    def add_bytes(self, data: bytes) -> Digest:
        digest = Digest.of(data, _FN)
        if not self.has(digest):
            fd, tmp = self._tmp_file()
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._install(tmp, digest)
        return digest

    def add_stream(self, digest: Digest, chunks: Iterator[bytes]) -> None:
        """Store a downloaded blob, verified before it becomes visible."""
        h = hashlib.sha256()
        size = 0
        fd, tmp = self._tmp_file()
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if size != digest.size or h.hexdigest() != digest.hash:
                raise DigestMismatch(f"download of {digest} got {h.hexdigest()}/{size}")
            self._install(tmp, digest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def add_file(self, path: str | os.PathLike, link: bool = False) -> Digest:
        """Store a file, hashing it once while copying it.

        `link=True` hard-links the file itself into the cache when it is new (no
        copy): only for files nobody will modify afterwards, since the object and
        the file are then the same inode; the file is made read-only.
        """
        if link:
            digest = _hash_file(path)
            target = self.object_path(digest)
            if not target.exists():
                target.parent.mkdir(exist_ok=True)
                os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & 0o555)
                try:
                    os.link(path, target)
                except FileExistsError:
                    pass
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    return self.add_file(path, link=False)
            return digest
        h = hashlib.sha256()
        size = 0
        fd, tmp = self._tmp_file()
        try:
            with open(path, "rb", buffering=0) as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(_READ):
                    h.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            digest = Digest(h.hexdigest(), size, _FN)
            if digest.size == 0:
                os.unlink(tmp)
            else:
                self._install(tmp, digest)
            return digest
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def read_bytes(self, digest: Digest) -> bytes:
        if digest.size == 0:
            return b""
        try:
            return self.object_path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(digest, f"not in local cache {self.root}") from None

    def directory(self, digest: Digest) -> re_pb2.Directory:
        return re_pb2.Directory.FromString(self.read_bytes(digest))

    # -- commit --------------------------------------------------------------------

    def commit(self, path: str | os.PathLike, ref: str | None = None, link: bool = False) -> Digest:
        """Store a directory tree; returns (and optionally names) its root digest.

        Unchanged files hash to existing objects, so re-committing an unchanged
        tree writes no new object.
        """
        path = Path(path)
        if not path.is_dir():
            raise InvalidArgument(f"{path} is not a directory")
        with self.adding():
            build = build_tree(path, _FN, hasher=lambda p, fn: self.add_file(p, link=link))
            for digest, data in build.directories.items():
                if not self.has(digest):
                    self.add_bytes(data)
            if ref is not None:
                self.set_ref(ref, build.root)
        return build.root

    # -- refs ----------------------------------------------------------------------

    def _ref_path(self, name: str) -> Path:
        if not name or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
            raise InvalidArgument(f"invalid ref name {name!r}")
        return self.refs / name

    def set_ref(self, name: str, digest: Digest) -> None:
        path = self._ref_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{self.tmp}/ref-{os.getpid()}-{time.monotonic_ns()}"
        Path(tmp).write_text(f"{digest.hash}/{digest.size}\n")
        os.replace(tmp, path)

    def resolve(self, name_or_digest: str, touch: bool = True) -> Digest:
        """A ref name, or a digest given as `HASH/SIZE`."""
        if "/" in name_or_digest:
            head, _, tail = name_or_digest.rpartition("/")
            if len(head) == 64 and tail.isdigit() and not (self.refs / name_or_digest).exists():
                return Digest.parse(name_or_digest)
        path = self._ref_path(name_or_digest)
        try:
            digest = Digest.parse(path.read_text().strip())
        except FileNotFoundError:
            raise NotFound(f"no ref {name_or_digest!r} in {self.root}") from None
        if touch:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
        return digest

    def list_refs(self) -> list[tuple[str, Digest, float]]:
        """(name, digest, last use), most recently used first."""
        out = []
        for dirpath, _, files in os.walk(self.refs):
            for name in files:
                full = Path(dirpath) / name
                try:
                    digest = Digest.parse(full.read_text().strip())
                    out.append((str(full.relative_to(self.refs)), digest, full.stat().st_mtime))
                except (FileNotFoundError, InvalidArgument):
                    continue
        out.sort(key=lambda item: item[2], reverse=True)
        return out

    def remove_ref(self, name: str) -> None:
        path = self._ref_path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"no ref {name!r} in {self.root}") from None
        parent = path.parent
        while parent != self.refs:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    # -- walking -------------------------------------------------------------------

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

    # -- checkout ------------------------------------------------------------------

    def checkout(self, root: Digest, dest: str | os.PathLike, copy: bool = False) -> int:
        """Materialize a tree into `dest` (created; must be empty if it exists)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise InvalidArgument(f"checkout target {dest} is not empty")
        files = 0
        for prefix, directory in self.walk(root):
            base = dest / prefix
            for node in directory.directories:
                (base / node.name).mkdir()
            for node in directory.files:
                self._place(Digest(node.digest.hash, node.digest.size_bytes), base / node.name,
                            node.is_executable, copy)
                files += 1
            for node in directory.symlinks:
                os.symlink(node.target, base / node.name)
        return files

    def _place(self, digest: Digest, target: Path, executable: bool, copy: bool) -> None:
        if digest.size == 0:
            target.touch()
            os.chmod(target, 0o755 if executable else 0o644)
            return
        source = self._executable_twin(digest) if executable else self.object_path(digest)
        if not source.exists():
            raise BlobNotFound(digest, f"not in local cache {self.root}")
        if not copy:
            try:
                os.link(source, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
        shutil.copyfile(source, target)
        os.chmod(target, 0o755 if executable else 0o644)

    def _executable_twin(self, digest: Digest) -> Path:
        twin = self.object_path(digest).with_suffix(".x")
        if not twin.exists():
            fd, tmp = self._tmp_file()
            os.close(fd)
            try:
                shutil.copyfile(self.object_path(digest), tmp)
            except FileNotFoundError:
                os.unlink(tmp)
                raise BlobNotFound(digest, f"not in local cache {self.root}") from None
            os.chmod(tmp, 0o555)
            os.replace(tmp, twin)
        return twin

    # -- diff ----------------------------------------------------------------------

    def diff(self, a: Digest, b: Digest) -> TreeDiff:
        """Paths added, removed and modified from tree `a` to tree `b` (files and symlinks;
        a whole new or removed directory is listed as its files)."""
        result = TreeDiff()
        self._diff(a, b, "", result)
        for lst in (result.added, result.removed, result.modified):
            lst.sort()
        return result

    def _entries(self, digest: Digest | None) -> dict[str, tuple[str, object]]:
        if digest is None:
            return {}
        d = self.directory(digest)
        entries: dict[str, tuple[str, object]] = {}
        for n in d.files:
            entries[n.name] = ("file", (n.digest.hash, n.is_executable))
        for n in d.symlinks:
            entries[n.name] = ("symlink", n.target)
        for n in d.directories:
            entries[n.name] = ("dir", Digest(n.digest.hash, n.digest.size_bytes))
        return entries

    def _diff(self, a: Digest | None, b: Digest | None, prefix: str, result: TreeDiff) -> None:
        if a == b:
            return
        left, right = self._entries(a), self._entries(b)
        for name in sorted(set(left) | set(right)):
            path = f"{prefix}{name}"
            la, rb = left.get(name), right.get(name)
            if (la is not None and la[0] == "dir") or (rb is not None and rb[0] == "dir"):
                da = la[1] if la is not None and la[0] == "dir" else None
                db = rb[1] if rb is not None and rb[0] == "dir" else None
                if la is not None and la[0] != "dir":
                    result.removed.append(path)
                if rb is not None and rb[0] != "dir":
                    result.added.append(path)
                self._diff(da, db, f"{path}/", result)  # type: ignore[arg-type]
            elif la is None:
                result.added.append(path)
            elif rb is None:
                result.removed.append(path)
            elif la != rb:
                result.modified.append(path)

    # -- maintenance ---------------------------------------------------------------

    def _all_objects(self) -> Iterator[tuple[Path, Digest | None]]:
        for prefix in os.scandir(self.objects):
            if not prefix.is_dir():
                continue
            for entry in os.scandir(prefix.path):
                name = entry.name.removesuffix(".x")
                if len(name) == 64:
                    yield Path(entry.path), Digest(name, entry.stat().st_size)
                else:
                    yield Path(entry.path), None

    def reachable(self) -> set[str]:
        hashes: set[str] = set()
        for _, root, _ in self.list_refs():
            hashes.update(d.hash for d in self.tree_digests(root, missing_ok=True))
        return hashes

    def prune(self) -> PruneReport:
        """Delete every object no ref reaches (and stale temporary files)."""
        report = PruneReport()
        with self._locked(exclusive=True):
            keep = self.reachable()
            for path, digest in self._all_objects():
                if digest is None or digest.hash not in keep:
                    report.bytes_removed += path.stat().st_size if path.exists() else 0
                    path.unlink(missing_ok=True)
                    report.objects_removed += 1
            horizon = time.time() - 3600
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < horizon:
                        os.unlink(entry.path)
        return report

    def size(self) -> int:
        return sum(p.stat().st_size for p, _ in self._all_objects() if p.exists())

    def gc(self, quota: int) -> PruneReport:
        """Evict least recently used refs, then prune, until the objects fit in `quota`."""
        report = self.prune()
        refs = self.list_refs()  # most recent first
        while refs and self.size() > quota:
            name, _, _ = refs.pop()
            with contextlib.suppress(NotFound):
                self.remove_ref(name)
            report.refs_removed.append(name)
            step = self.prune()
            report.objects_removed += step.objects_removed
            report.bytes_removed += step.bytes_removed
        return report

    def fsck(self, remove: bool = True) -> list[Digest]:
        """Re-hash every object; corrupt ones are removed (and returned)."""
        corrupt: list[Digest] = []
        for path, digest in self._all_objects():
            if digest is None:
                continue
            actual = _hash_file(path)
            if actual.hash != digest.hash:
                corrupt.append(digest)
                if remove:
                    path.unlink(missing_ok=True)
        return corrupt


def _hash_file(path: str | os.PathLike) -> Digest:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ):
            h.update(chunk)
            size += len(chunk)
    return Digest(h.hexdigest(), size, _FN)
