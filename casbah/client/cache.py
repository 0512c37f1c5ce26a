"""The local CAS cache: objects, named refs, commit/checkout/diff, prune, quota, fsck.

Layout (compatible in spirit with BuildStream's CASCache):

    objects/<2 hex>/<sha256>   content, read-only; `<sha256>.x` is the executable twin
    refs/<name>                 text `HASH/SIZE`; names may contain `/`; mtime = last use
    tmp/                        writes in progress (same filesystem: links are atomic)
    lock                        flock: shared while adding objects, exclusive while pruning

Safe for several processes at once: objects and refs appear atomically (renamed
into place from tmp/, so nobody sees a torn one; an object is written only when
absent, so an existing one is not rewritten), and prune holds the lock
exclusively, so it never deletes an object that a concurrent commit or pull has
written but not yet referenced.

Checkouts hard-link objects (they are read-only, so a build cannot corrupt the
cache through a checkout without first chmod-ing a file); executable files link
the `.x` twin, because a mode is per inode.  Where a hard link is impossible
(another filesystem), or with `copy=True`, files are copied and get ordinary
0644/0755 modes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from casbah.client.materialise import LINK_FALLBACK, Materialiser, plan_tree
from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, DigestMismatch, InvalidArgument, NotFound
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.tree import build_tree

_READ = 1024 * 1024
_FN = DigestFunction.SHA256
#: Files up to this size are read whole (one read, hashed, written only if new); larger
#: ones are hashed first and copied only if new.  Either way an unchanged file is never written.
_SMALL = 1024 * 1024
_LINK_FALLBACK = LINK_FALLBACK


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


@dataclass
class FsckReport:
    corrupt: list[Digest] = field(default_factory=list)
    #: ref name -> digests its tree needs that the cache lacks
    incomplete: dict[str, list[Digest]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.corrupt and not self.incomplete


class LocalCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self.objects = self.root / "objects"
        self.refs = self.root / "refs"
        self.tmp = self.root / "tmp"
        for d in (self.objects, self.refs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._objects = str(self.objects)
        self._tmp = str(self.tmp)
        self._tmp_prefix = f"{self._tmp}/{os.getpid()}-{os.urandom(6).hex()}-"
        self._tmp_counter = itertools.count()
        # All 256 fan-out directories up front: storing an object is then one link, no mkdir.
        if not os.path.isdir(f"{self._objects}/ff"):
            for i in range(256):
                os.makedirs(f"{self._objects}/{i:02x}", exist_ok=True)
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
        """Hold while adding objects that no ref names yet (commit, pull), or while reading
        a tree that must not be pruned underneath (checkout)."""
        return self._locked(exclusive=False)

    # -- objects -------------------------------------------------------------------

    def object_path(self, digest: Digest) -> Path:
        return self.objects / digest.hash[:2] / digest.hash

    def _object(self, hash_hex: str) -> str:
        return f"{self._objects}/{hash_hex[:2]}/{hash_hex}"

    def has(self, digest: Digest) -> bool:
        return digest.size == 0 or os.path.exists(self._object(digest.hash))

    def missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return [d for d in digests if not self.has(d)]

    def _tmp_file(self) -> tuple[int, str]:
        """A new read-only file in tmp/ (named without a syscall: a pull creates thousands)."""
        name = f"{self._tmp_prefix}{next(self._tmp_counter)}"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444), name
        except FileExistsError:  # a forked child shares the prefix; start a new series
            self._tmp_prefix = f"{self._tmp}/{os.getpid()}-{os.urandom(6).hex()}-"
            return self._tmp_file()

    def _install(self, tmp: str, digest: Digest) -> None:
        """Move a verified temporary file into place (one atomic rename).

        Callers check first that the object is absent, so an object is only ever
        replaced when two writers race on the same blob, and then by identical bytes.
        """
        os.rename(tmp, self._object(digest.hash))

    @contextlib.contextmanager
    def _new_object(self, digest: Digest) -> Iterator[int]:
        """A temporary file to write `digest`'s bytes into (the fd is yielded); installed as
        the object when the block ends normally, removed if it raises."""
        fd, tmp = self._tmp_file()
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

    def _write_object(self, digest: Digest, data: bytes | memoryview) -> None:
        with self._new_object(digest) as fd:
            _write_all(fd, data)

    def add_bytes(self, data: bytes) -> Digest:
        digest = Digest.of(data, _FN)
        if not self.has(digest):
            self._write_object(digest, data)
        return digest

    def add_verified(self, digest: Digest, data: bytes) -> None:
        """Store a blob whose content the caller has already checked against `digest`
        (the remote client verifies every download)."""
        if digest.size and not os.path.exists(self._object(digest.hash)):
            self._write_object(digest, data)

    def add_stream(self, digest: Digest, chunks: Iterable[bytes], verify: bool = True) -> None:
        """Store a downloaded blob, verified before it becomes visible (`verify=False`
        when the chunks come from a source that raises on a mismatch at the end)."""
        h = hashlib.sha256() if verify else None
        size = 0
        with self._new_object(digest) as fd:
            for chunk in chunks:
                if h is not None:
                    h.update(chunk)
                size += len(chunk)
                _write_all(fd, chunk)
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
                digest = Digest(hashlib.sha256(data).hexdigest(), len(data), _FN)
                if digest.size and not os.path.exists(self._object(digest.hash)):
                    if not (link and self._link_in(path, st, digest)):
                        self._write_object(digest, data)
                return digest
            digest = _hash_fileobj(src)
            if os.path.exists(self._object(digest.hash)):
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
            os.link(path, self._object(digest.hash))
        except FileExistsError:
            return True
        except OSError as exc:
            if exc.errno in _LINK_FALLBACK:
                return False  # nothing changed: the caller copies
            raise
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o444)  # the file and the object are one inode now
        return True

    def _copy_in(self, src, digest: Digest, path: str) -> None:
        """Copy an open file into the cache, re-hashing it: a file modified since it was
        hashed must not be stored under the old digest."""
        h = hashlib.sha256()
        size = 0
        with self._new_object(digest) as fd:
            while chunk := src.read(_READ):
                h.update(chunk)
                size += len(chunk)
                _write_all(fd, chunk)
            if size != digest.size or h.hexdigest() != digest.hash:
                raise InvalidArgument(f"{path} changed while being stored")

    def read_bytes(self, digest: Digest) -> bytes:
        if digest.size == 0:
            return b""
        try:
            with open(self._object(digest.hash), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BlobNotFound(digest, f"not in local cache {self.root}") from None

    def directory(self, digest: Digest) -> re_pb2.Directory:
        return re_pb2.Directory.FromString(self.read_bytes(digest))

    # -- commit --------------------------------------------------------------------

    def commit(self, path: str | os.PathLike, ref: str | None = None, link: bool = False) -> Digest:
        """Store a directory tree; returns (and optionally names) its root digest.

        Unchanged files hash to existing objects, which are not written again, so
        re-committing an unchanged tree writes no object.  Files are stored first; the
        Directory messages are then built by `casbah.tree.build_tree` (the same code the
        server uses, so both agree on every digest), which looks the stored files up
        instead of reading them again.  (One thread: on a 2-core machine, threads only
        added GIL hand-offs; the cost is the file system's inode allocation.)
        """
        path = Path(path)
        if not path.is_dir():
            raise InvalidArgument(f"{path} is not a directory")
        with self.adding():
            stored = {f: self.add_file(f, link=link) for f in _regular_files(str(path))}

            def hasher(file: Path, function: DigestFunction) -> Digest:
                digest = stored.get(str(file))
                return digest if digest is not None else self.add_file(file, link=link)

            build = build_tree(path, _FN, hasher=hasher)
            for digest, data in build.directories.items():
                if digest.size and not self.has(digest):
                    self._write_object(digest, data)
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
        tmp = f"{self._tmp}/ref-{os.getpid()}-{time.monotonic_ns()}-{os.urandom(4).hex()}"
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
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
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
        except (FileNotFoundError, IsADirectoryError):
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

    def checkout(self, root: Digest, dest: str | os.PathLike, copy: bool = False,
                 allow_external_symlinks: bool = False, within: str | os.PathLike | None = None) -> int:
        """Materialize a tree into `dest` (created; must be empty if it exists).

        The whole tree is checked first (names, symlinks: `casbah.client.materialise`),
        and every object it needs must be present, so a bad or incomplete tree fails
        before anything is written; the tree is then written beneath `dest` without
        following any link there (nor in `dest`'s components below `within`, if given).
        """
        dest = Path(dest)
        if dest.exists() and not dest.is_dir():
            raise InvalidArgument(f"checkout target {dest} exists and is not a directory")
        if dest.is_dir() and any(dest.iterdir()):
            raise InvalidArgument(f"checkout target {dest} is not empty")
        with self.adding():
            plan = plan_tree(root, self.directory, allow_external_symlinks)
            absent = {d for _, _, d, _ in plan.files if d.size and not os.path.exists(self._object(d.hash))}
            if absent:
                example = min(absent)
                raise BlobNotFound(example, f"not in local cache {self.root} ({len(absent)} objects of the tree "
                                            "are missing; pull it again)")
            if not copy:
                for digest in {d for _, _, d, x in plan.files if x and d.size}:
                    self._executable_twin(digest)
            with Materialiser(plan, dest, within=within) as out:
                self._place_all(out, copy)
        return len(plan.files)

    def _place_all(self, out: Materialiser, copy: bool) -> None:
        for index, name, digest, executable in out.plan.files:
            if digest.size == 0:  # no object to link: a new file, read-only like the linked ones unless copying
                os.close(out.new_file(index, name, (0o755 if executable else 0o644) & (0o777 if copy else 0o555)))
                continue
            source = self._object(digest.hash)
            if not copy and out.link(source + ".x" if executable else source, index, name):
                continue
            out.copy(source, index, name, 0o755 if executable else 0o644)

    def _executable_twin(self, digest: Digest) -> str:
        """`<hash>.x`, a mode-0555 copy of the object (made on first use)."""
        twin = self._object(digest.hash) + ".x"
        if not os.path.exists(twin):
            fd, tmp = self._tmp_file()
            os.close(fd)
            try:
                shutil.copyfile(self._object(digest.hash), tmp)
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

    def _all_objects(self) -> Iterator[tuple[str, str | None, int]]:
        """(path, hash or None for a stray file, size) of every object file."""
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
            for path, hash_hex, size in self._all_objects():
                if hash_hex is None or hash_hex not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        report.bytes_removed += size
                        report.objects_removed += 1
            horizon = time.time() - 3600
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < horizon:
                        os.unlink(entry.path)
        return report

    def size(self) -> int:
        return sum(size for _, _, size in self._all_objects())

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

    def fsck(self, remove: bool = True) -> FsckReport:
        """Re-hash every object (corrupt ones are removed and reported), then check that
        every ref's tree is complete."""
        report = FsckReport()
        for path, hash_hex, size in self._all_objects():
            if hash_hex is None:
                continue
            try:
                with open(path, "rb", buffering=0) as f:
                    actual = _hash_fileobj(f)
            except FileNotFoundError:
                continue
            if actual.hash != hash_hex:
                report.corrupt.append(Digest(hash_hex, size))
                if remove:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        for name, root, _ in self.list_refs():
            try:
                absent = sorted(self.missing(self.tree_digests(root, missing_ok=True)))
            except Exception:  # an undecodable Directory is as broken as a missing one
                report.incomplete[name] = [root]
                continue
            if absent:
                report.incomplete[name] = absent
        return report


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _regular_files(top: str) -> list[str]:
    """Every regular file under `top` (symlinks not followed); whatever else is there is
    left for build_tree, which refuses special files by name."""
    out: list[str] = []
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    out.append(entry.path)
    return out


def _hash_fileobj(f) -> Digest:
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(_READ):
        h.update(chunk)
        size += len(chunk)
    return Digest(h.hexdigest(), size, _FN)


def _hash_file(path: str | os.PathLike) -> Digest:
    with open(path, "rb", buffering=0) as f:
        return _hash_fileobj(f)
