"""Directory trees as REAPI `Directory` messages: building them from a local
directory, and checking that a stored tree is complete in CAS.

Server (origin fetch, asset checks) and client (local cache, uploads) share these,
so a tree committed by one hashes to the same root digest as the other.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from casbah.digest import Digest, DigestFunction, is_empty_blob, make_digest
from casbah.errors import InvalidArgument, InvalidTree
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.tree_rules import check_directory, directory_problem, echo, join

_READ = 1024 * 1024


def hash_file(path: str | os.PathLike, function: DigestFunction) -> Digest:
    size = 0
    with open(path, "rb", buffering=0) as f:
        h = function.hasher(os.fstat(f.fileno()).st_size)  # gitsha1 hashes the size first
        while chunk := f.read(_READ):
            h.update(chunk)
            size += len(chunk)
    return Digest(h.hexdigest(), size, function)


@dataclass
class TreeBuild:
    """A directory turned into Directory messages; nothing is uploaded yet."""

    root: Digest
    directories: dict[Digest, bytes] = field(default_factory=dict)
    files: dict[Digest, Path] = field(default_factory=dict)  # one path per distinct content
    file_count: int = 0
    total_bytes: int = 0


def build_tree(path: str | os.PathLike, function: DigestFunction = DigestFunction.SHA256,
               hasher: Callable[[Path, DigestFunction], Digest] = hash_file) -> TreeBuild:
    """Walk `path` into canonical Directory messages (names sorted, as REAPI requires).

    Regular files keep their executable bit, symlinks their target verbatim;
    anything else (sockets, devices, FIFOs) is refused, naming the path, because
    it cannot be represented in CAS and silently dropping it would make a
    different tree.
    """
    build = TreeBuild(root=Digest("", 0, function))
    build.root = _walk(Path(path), function, hasher, build)
    return build


def _walk(path: Path, function: DigestFunction, hasher: Callable, build: TreeBuild) -> Digest:
    directory = re_pb2.Directory()
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        full = Path(entry.path)
        _check_utf8(entry.name, full, "name")
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            _check_utf8(target, full, "symlink target")
            directory.symlinks.add(name=entry.name, target=target)
        elif stat.S_ISDIR(st.st_mode):
            child = _walk(full, function, hasher, build)
            directory.directories.add(name=entry.name, digest=re_pb2.Digest(hash=child.hash, size_bytes=child.size))
        elif stat.S_ISREG(st.st_mode):
            digest = hasher(full, function)
            build.files.setdefault(digest, full)
            build.file_count += 1
            build.total_bytes += digest.size
            directory.files.add(
                name=entry.name, digest=re_pb2.Digest(hash=digest.hash, size_bytes=digest.size),
                is_executable=bool(st.st_mode & stat.S_IXUSR),
            )
        else:
            raise InvalidArgument(f"{full}: special file (mode {stat.filemode(st.st_mode)}) cannot be stored in CAS")
    data = directory.SerializeToString(deterministic=True)
    digest = Digest.of(data, function)
    build.directories[digest] = data
    return digest


def _check_utf8(text: str, path: Path, what: str) -> None:
    """REAPI names are protobuf strings (UTF-8); a non-UTF-8 name cannot be stored."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{path!r}: {what} is not valid UTF-8 and cannot be stored in CAS") from None


def child_digests(directory: re_pb2.Directory, function: DigestFunction) -> tuple[list[Digest], list[Digest]]:
    """(subdirectory digests, file digests) of one Directory, validated."""
    dirs = [make_digest(n.digest.hash, n.digest.size_bytes, function) for n in directory.directories]
    files = [make_digest(n.digest.hash, n.digest.size_bytes, function) for n in directory.files]
    return dirs, files


@dataclass(frozen=True, slots=True)
class Visit:
    """One distinct Directory of a walked tree."""

    digest: Digest
    path: str  # where the walk first met it ("" is a root)
    directory: re_pb2.Directory | None  # None: absent from CAS
    data: bytes  # as stored (b"" when absent): the bytes its digest names

    @property
    def size(self) -> int:
        return len(self.data)


async def walk_levels(read_many: Callable[[list[Digest]], Awaitable[dict[Digest, bytes]]],
                      roots: Iterable[tuple[Digest, str]],
                      check: Callable[[re_pb2.Directory, str, str], None] | None = check_directory,
                      ) -> AsyncIterator[list[Visit]]:
    """The Directory messages under `roots`, breadth-first, one level per item.

    One `read_many` per level keeps storage round trips at the tree's depth; each
    directory is visited once (at the first path that reaches it).  Every
    Directory read is checked against the REAPI's name and order rules *before*
    its level is yielded, so no caller ever sees, stores or serves a level with
    a bad entry: InvalidTree names the entry's path and the directory's digest.
    The empty Directory is never read (it exists without upload).  `read_many`
    is a storage's (or one that turns lost blobs into absent ones); taking the
    function keeps this module free of the storage package, which clients import.
    `check` (path, digest text) is the per-Directory rule; a client that only
    gathers a tree to check it later its own way (`materialise.plan_tree`) passes None.
    """
    level: list[tuple[Digest, str]] = []
    seen: set[Digest] = set()
    for digest, path in roots:
        if digest not in seen:
            seen.add(digest)
            level.append((digest, path))
    while level:
        found = await read_many([d for d, _ in level if not is_empty_blob(d)])
        visits: list[Visit] = []
        next_level: list[tuple[Digest, str]] = []
        for digest, path in level:
            if is_empty_blob(digest):
                visits.append(Visit(digest, path, re_pb2.Directory(), b""))
                continue
            data = found.get(digest)
            if data is None:
                visits.append(Visit(digest, path, None, b""))
                continue
            try:
                directory = re_pb2.Directory.FromString(data)
            except DecodeError:
                where = f"at {echo(path)}" if path else "at the root"
                raise InvalidTree(f"blob {digest} {where} is not a Directory message") from None
            if check is not None:
                check(directory, path, str(digest))
            visits.append(Visit(digest, path, directory, data))
            for node in directory.directories:
                child = make_digest(node.digest.hash, node.digest.size_bytes, digest.function)
                if child not in seen:
                    seen.add(child)
                    next_level.append((child, join(path, node.name)))
        yield visits
        level = next_level


def first_missing_directory(root: Digest, directories: Mapping[Digest, bytes]) -> Digest | None:
    """The root, or a subdirectory any of `directories` names, that `directories` lacks;
    None when the tree is closed.  GetTree leaves out subtrees the server lacks, so a
    client checks its answer with this before taking it for the whole tree."""
    if root.size and root not in directories:
        return root
    for data in directories.values():
        for node in re_pb2.Directory.FromString(data).directories:
            child = Digest(node.digest.hash, node.digest.size_bytes, root.function)
            if child.size and child not in directories:
                return child
    return None


def check_tree_message(tree: re_pb2.Tree, tree_digest: Digest) -> None:
    """Check every Directory of a REAPI `Tree` (an output directory), naming a bad entry by path.

    GetActionResult runs this on every hit, so the common case is one pass of the
    pure rules; only when a child fails are children hashed to find its path
    (by the digest of its canonical serialization, what clients upload).  A child
    no DirectoryNode reaches is named by its position in `children`.
    """
    check_directory(tree.root, "", f"root of Tree {tree_digest}")
    bad = next((i for i, child in enumerate(tree.children) if directory_problem(child) is not None), None)
    if bad is None:
        return
    function = tree_digest.function
    by_digest = {Digest.of(c.SerializeToString(deterministic=True), function): i for i, c in enumerate(tree.children)}
    reached: dict[int, str] = {}
    level = [(tree.root, "")]
    while level and bad not in reached:
        next_level = []
        for directory, path in level:
            for node in directory.directories:
                index = by_digest.get(make_digest(node.digest.hash, node.digest.size_bytes, function))
                if index is not None and index not in reached:
                    reached[index] = join(path, node.name)
                    next_level.append((tree.children[index], reached[index]))
        level = next_level
    child = Digest.of(tree.children[bad].SerializeToString(deterministic=True), function)
    where = f"{child} (children[{bad}] of Tree {tree_digest})"
    check_directory(tree.children[bad], reached.get(bad, f"<children[{bad}]>"), where)


async def missing_in_tree(cas, root: Digest) -> list[Digest]:
    """Digests of the tree under `root` absent from `cas` (empty = complete).

    Reads one level of Directory messages per round trip, then asks for all
    files at once.  A stored blob that is not a valid Directory, names malformed
    digests or breaks the REAPI's name rules raises InvalidArgument (InvalidTree):
    the tree is unusable, not missing.
    """
    missing, _ = await _scan_tree(cas, root)
    return missing


async def _scan_tree(cas, root: Digest) -> tuple[list[Digest], list[Digest]]:
    """(missing digests, every non-empty digest of the tree, directories included)."""
    if is_empty_blob(root):
        return [], []
    missing: list[Digest] = []
    files: set[Digest] = set()
    directories: list[Digest] = []
    async for visits in walk_levels(cas.read_many, [(root, "")]):
        for visit in visits:
            if visit.directory is None:
                missing.append(visit.digest)
                continue
            if not is_empty_blob(visit.digest):
                directories.append(visit.digest)
            _, file_digests = child_digests(visit.directory, root.function)
            files.update(d for d in file_digests if not is_empty_blob(d))
    if files:
        missing.extend(await cas.find_missing(list(files)))
    return missing, directories + [d for d in files]


class CompleteTrees:
    """Remembers the blobs of trees recently found complete, per storage.

    Walking a big tree costs one read per level plus decoding every Directory;
    re-checking a remembered one is a single FindMissing over its blobs, which
    also keeps them alive in an LRU store.  A tree is therefore never reported
    complete after one of its blobs was evicted (only the walk is cached, never
    the answer).  The cache is bounded by the number of digests it holds; trees
    larger than a quarter of that are not remembered.
    """

    def __init__(self, max_digests: int = 250_000) -> None:
        self.max_digests = max_digests
        self._held = 0
        self._seen: OrderedDict[tuple[int, Digest], tuple[Digest, ...]] = OrderedDict()

    async def missing(self, cas, root: Digest) -> list[Digest]:
        if is_empty_blob(root):
            return []
        key = (id(cas), root)  # storages live as long as the server: id() is stable
        known = self._seen.get(key)
        if known is not None:
            missing = await cas.find_missing(known)
            if not missing:
                if key in self._seen:
                    self._seen.move_to_end(key)
                return []
            self._forget(key)
            return missing
        missing, everything = await _scan_tree(cas, root)
        if not missing and len(everything) <= self.max_digests // 4 and key not in self._seen:
            self._seen[key] = tuple(everything)
            self._held += len(everything)
            while self._held > self.max_digests and self._seen:
                _, dropped = self._seen.popitem(last=False)
                self._held -= len(dropped)
        return missing

    def _forget(self, key: tuple[int, Digest]) -> None:
        dropped = self._seen.pop(key, None)
        if dropped is not None:
            self._held -= len(dropped)
