"""Writing a REAPI Directory tree to disk: the one place every command does it.

`cache checkout`, `cache pull --checkout`, `cas download`, `source fetch` and
`source fetch-all` all write trees that came from a server or a local cache, and a
tree is just data anyone with write access to a CAS can make up: a FileNode named
`../../victim`, a symlink `etc -> /etc`.  So writing happens in two steps:

1. `plan_tree` reads every Directory of the tree and checks it *before anything is
   written*: every name (files, directories, symlinks) is non-empty, has no `/` or
   NUL and is not `.` or `..`; no name appears twice in one Directory; a symlink
   target is non-empty and NUL-free and, unless external symlinks are allowed,
   neither absolute nor leaving the tree once resolved relative to the link's own
   directory (through the tree's other symlinks too: `d/l -> ..` and `m -> d/l/..`
   together leave it).  A bad tree raises `UnsafeTree` naming the path.
2. `Materialiser` writes the plan beneath the destination only through directory
   file descriptors: `mkdir`/`open`/`symlink`/`link` relative to the fd of the
   directory this run created, every directory opened `O_NOFOLLOW|O_DIRECTORY`,
   every file created `O_CREAT|O_EXCL|O_NOFOLLOW`.  No call resolves a path that
   goes through an entry of the destination, so nothing the destination holds (a
   symlink to elsewhere, a file where a directory belongs) can send a write outside.

The destination path itself is the user's: it is followed if it is a symlink and
created with its parents if absent (with `within`, only the part up to `within` is
the user's; the components below it are opened without following links, as
`fetch-all` does for each source's directory inside its DEST).  It must be absent or an empty directory.  Every
entry of the tree is created new and never replaces or enters anything: if an entry
appears at one of the tree's paths meanwhile (a concurrent process), the run stops
with `FailedPrecondition` naming the path.

Nothing half-written: on any failure, what this run created is removed (each
top-level entry it made, with the fd-based `shutil.rmtree` that never follows
links, then the destination and its parents if this run made them).  Removing was
chosen over "build in a temporary sibling and rename into place" because the
destination may be a mount point or sit in a directory the user cannot write, and
a rename would replace the user's own (empty) directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from casbah.digest import Digest
from casbah.errors import FailedPrecondition, InvalidArgument
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.tree_rules import name_problem

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Symlinks expanded while resolving one target before it counts as unresolvable (Linux's limit).
_MAX_HOPS = 40
#: Directory fds kept open at once: enough to write a directory's files without reopening it,
#: few enough that a tree of 100k directories does not run out of descriptors.
_FD_CACHE = 128
#: Errors of `link` that mean "copy instead" (another file system, no permission, too many links).
LINK_FALLBACK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES)
#: Errors of a reflink or copy_file_range that mean "not here, try the next way".
_NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF, errno.ETXTBSY)
_EMPTY = re_pb2.Directory()

#: (directory index, name, digest, executable) of a file of the tree.
FileEntry = tuple[int, str, Digest, bool]


class UnsafeTree(InvalidArgument):
    """A tree that cannot be written safely: a bad or duplicate name, an unreadable
    Directory, or a symlink that leaves the tree (when that is not allowed)."""


@dataclass
class TreePlan:
    """A validated tree, flattened: directory 0 is the root; every other directory
    comes after its parent, so creating them in order always finds the parent."""

    root: Digest
    parents: list[int] = field(default_factory=lambda: [-1])
    names: list[str] = field(default_factory=lambda: [""])
    files: list[FileEntry] = field(default_factory=list)
    #: (directory index, name, target)
    symlinks: list[tuple[int, str, str]] = field(default_factory=list)

    def path(self, index: int, name: str | None = None) -> str:
        """The tree-relative path of directory `index` (or of `name` in it), for messages."""
        parts = [] if name is None else [name]
        while index > 0:
            parts.append(self.names[index])
            index = self.parents[index]
        return "/".join(reversed(parts)) or "."


def _symlink(target: str, dir_fd: int, name: str) -> None:
    os.symlink(target, name, dir_fd=dir_fd)


def plan_tree(root: Digest, directory: Callable[[Digest], re_pb2.Directory],
              allow_external_symlinks: bool = False) -> TreePlan:
    """Read and check the whole tree at `root`; `directory(digest)` returns a Directory
    (it may raise BlobNotFound).  Raises UnsafeTree naming the first bad path."""
    plan = TreePlan(root)
    checked: set[Digest] = set()
    stack = [(0, root)]
    while stack:
        index, digest = stack.pop()
        try:
            d = directory(digest) if digest.size else _EMPTY
        except DecodeError:
            raise UnsafeTree(f"unsafe tree: directory {plan.path(index)!r} ({digest}) is not a valid "
                             "Directory message") from None
        if digest not in checked:  # a Directory's names are the same wherever it appears
            _check_names(d, plan, index)
            checked.add(digest)
        plan.files.extend((index, n.name, Digest(n.digest.hash, n.digest.size_bytes), n.is_executable)
                          for n in d.files)
        plan.symlinks.extend((index, n.name, n.target) for n in d.symlinks)
        for node in d.directories:
            plan.parents.append(index)
            plan.names.append(node.name)
            stack.append((len(plan.names) - 1, Digest(node.digest.hash, node.digest.size_bytes)))
    _check_symlinks(plan, allow_external_symlinks)
    return plan


def _check_names(d: re_pb2.Directory, plan: TreePlan, index: int) -> None:
    seen: set[str] = set()
    for kind, nodes in (("file", d.files), ("directory", d.directories), ("symlink", d.symlinks)):
        for node in nodes:
            name = node.name
            if name_problem(name) is not None:
                raise UnsafeTree(f"unsafe tree: {kind} {plan.path(index, name)!r} has an invalid name "
                                 "(a name is non-empty, has no '/' or NUL, and is not '.' or '..')")
            if name in seen:
                raise UnsafeTree(f"unsafe tree: {plan.path(index, name)!r} appears twice in its directory")
            seen.add(name)


def _check_symlinks(plan: TreePlan, allow_external: bool) -> None:
    links: dict[tuple[str, ...], str] = {}
    for index, name, target in plan.symlinks:
        path = plan.path(index, name)
        if not target or "\0" in target:
            raise UnsafeTree(f"unsafe tree: symlink {path!r} has an empty target or one with NUL")
        links[tuple(path.split("/"))] = target
    if allow_external:
        return
    for parts, target in links.items():
        problem = _escape(parts[:-1], target, links)
        if problem:
            raise UnsafeTree(f"unsafe tree: symlink {'/'.join(parts)!r} -> {target!r} {problem} "
                             "(--allow-external-symlinks writes it anyway)")


def _escape(base: tuple[str, ...], target: str, links: dict[tuple[str, ...], str]) -> str:
    """Why following `target` from directory `base` could leave the tree ('' if it cannot).

    Resolves as the kernel would, expanding the tree's own symlinks; an entry the tree
    lacks is taken as a directory that may appear later, so `missing/../..` counts too."""
    if target.startswith("/"):
        return "is absolute"
    state = list(base)
    pending = target.split("/")[::-1]
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not state:
                return "points outside the tree"
            state.pop()
            continue
        state.append(part)
        link = links.get(tuple(state))
        if link is not None:
            hops += 1
            if hops > _MAX_HOPS or link.startswith("/"):
                return "does not resolve inside the tree"
            state.pop()
            pending.extend(link.split("/")[::-1])
    return ""


class Materialiser:
    """Writes a checked plan beneath `dest` (see the module doc for the rules).

    Entering creates the destination, every directory and every symlink; the caller
    then places the files with `new_file`, `link` or `copy` (from several threads if it
    likes); leaving with an exception removes everything this run created.
    """

    def __init__(self, plan: TreePlan, dest: str | os.PathLike, must_be_empty: bool = True,
                 within: str | os.PathLike | None = None) -> None:
        self.plan = plan
        self.dest = os.fspath(dest)
        #: The user's own directory `dest` lies in (fetch-all's DEST): the components of
        #: `dest` below it are treated like the tree's own, never followed if they are links.
        self.within = None if within is None else os.fspath(within)
        self._must_be_empty = must_be_empty
        self._lock = threading.Lock()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._root_fd = -1
        self._made_dest: list[str] = []  # the destination and parents this run created
        self._made_top: list[str] = []  # entries this run created directly in the destination

    def __enter__(self) -> Materialiser:
        try:
            self._root_fd = self._open_dest()
            plan = self.plan
            with self._lock:
                for index in range(1, len(plan.names)):
                    parent = plan.parents[index]
                    self._create(parent, plan.names[index], lambda fd, name: os.mkdir(name, 0o777, dir_fd=fd))
                for index, name, target in plan.symlinks:
                    self._create(index, name, functools.partial(_symlink, target))
        except BaseException:
            self._rollback()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._rollback()
        else:
            self._close()

    # -- placing files -----------------------------------------------------------

    def new_file(self, index: int, name: str, mode: int) -> int:
        """A new file (readable and writable fd, `mode` whatever the umask); the caller closes it."""
        with self._lock:
            fd = self._create(index, name, lambda dfd, n: os.open(n, _NEW_FILE, mode, dir_fd=dfd))
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def link(self, source: str, index: int, name: str) -> bool:
        """Hard-link `source` (a trusted path, e.g. a cache object) as `name`; False when
        the file system cannot (the caller copies instead)."""
        try:
            with self._lock:
                self._create(index, name, lambda dfd, n: os.link(source, n, dst_dir_fd=dfd))
        except OSError as exc:
            if exc.errno in LINK_FALLBACK:
                return False
            raise
        return True

    def copy(self, source: str, index: int, name: str, mode: int) -> None:
        """Copy the trusted file `source` as `name` with `mode`."""
        with open(source, "rb", buffering=0) as src:
            fd = self.new_file(index, name, mode)
            try:
                copy_fd(src.fileno(), fd)
            finally:
                os.close(fd)

    # -- internals ---------------------------------------------------------------

    def _open_dest(self) -> int:
        """Open (creating if need be) the destination: the trusted base as the user named
        it, then every component below it without following links."""
        base = self.within if self.within is not None else self.dest
        missing = []
        path = os.path.abspath(base)
        while not os.path.lexists(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
                self._made_dest.append(path)
        try:
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:
            raise InvalidArgument(f"{base} exists and is not a directory") from None
        rel = os.path.relpath(os.path.abspath(self.dest), os.path.abspath(base))
        path = base
        for part in [] if rel == "." else rel.split("/"):
            path = os.path.join(path, part)
            try:
                if part == "..":
                    raise InvalidArgument(f"{self.dest} is not inside {base}")
                try:
                    os.mkdir(part, dir_fd=fd)
                    self._made_dest.append(path)
                except FileExistsError:
                    pass
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise InvalidArgument(f"{path} is not a directory (links below {base} are not followed)") from None
            finally:
                os.close(fd)
            fd = child
        if self._must_be_empty and os.listdir(fd):
            os.close(fd)
            raise InvalidArgument(f"{self.dest} is not empty (a tree is written only into an empty directory)")
        return fd

    def _create(self, index: int, name: str, make: Callable[[int, str], int | None]):
        """Run `make(dir_fd, name)` in directory `index` (lock held); an existing entry is an error."""
        try:
            result = make(self._dir_fd(index), name)
        except FileExistsError:
            raise FailedPrecondition(f"{os.path.join(self.dest, self.plan.path(index, name))} exists already "
                                     "(a checkout never replaces or enters what it did not create)") from None
        if index == 0:
            self._made_top.append(name)
        return result

    def _dir_fd(self, index: int) -> int:
        """An fd of directory `index`, opened from its parent's without following links."""
        if index == 0:
            return self._root_fd
        chain = []
        while index > 0 and index not in self._fds:
            chain.append(index)
            index = self.plan.parents[index]
        fd = self._root_fd if index == 0 else self._fds[index]
        if index > 0:
            self._fds.move_to_end(index)
        for child in reversed(chain):
            try:
                fd = os.open(self.plan.names[child], _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    raise FailedPrecondition(f"{os.path.join(self.dest, self.plan.path(child))} is no longer the "
                                             "directory this run created") from None
                raise
            self._fds[child] = fd
            if len(self._fds) > _FD_CACHE:
                os.close(self._fds.popitem(last=False)[1])
        return fd

    def _close(self) -> None:
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1

    def _rollback(self) -> None:
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])
            for name in reversed(self._made_top):
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=self._root_fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(name, dir_fd=self._root_fd)
                    else:
                        os.unlink(name, dir_fd=self._root_fd)
            self._made_top.clear()
        self._close()
        for path in reversed(self._made_dest):
            with contextlib.suppress(OSError):
                os.rmdir(path)


#: ioctl FICLONE (linux/fs.h): make `dst` share `src`'s extents (btrfs, XFS, bcachefs...).
FICLONE = 0x40049409


def copy_fd(src: int, dst: int) -> None:
    """Copy a whole file between fds as cheaply as the file system allows: a reflink
    (shared extents, copy-on-write: instant, no space), else copy_file_range, else
    sendfile, else reads and writes.  `dst` must be empty."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError as exc:
        if exc.errno not in _NO_CLONE:
            raise
    offset = 0
    try:
        if hasattr(os, "copy_file_range"):
            while copied := os.copy_file_range(src, dst, 1 << 30, offset, offset):
                offset += copied
            return
    except OSError as exc:
        if exc.errno not in _NO_CLONE or offset:
            raise
    try:
        while sent := os.sendfile(dst, src, offset, 1 << 30):
            offset += sent
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or offset:
            raise
    os.lseek(src, 0, os.SEEK_SET)
    while chunk := os.read(src, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
