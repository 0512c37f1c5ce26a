"""The REAPI's rules for names in a Directory, as pure functions (no I/O).

A tree the server stores or serves is materialised by clients as files on disk;
a name like `../../x` or `a/b` would write outside the place the client meant.
The REAPI (`Directory` in remote_execution.proto) requires every child to be one
path segment, unique within its Directory, with files, directories and symlinks
each sorted by name (code point order, i.e. UTF-8 bytes).  `.` and `..` are
segments no client can create as entries, and NUL cannot appear in a file name,
so they are refused too.

Canonical *serialization* (field order, no unknown fields) and node property order
are not checked: they only change a digest, never where a client writes.  Symlink
targets are not checked either: absolute and `..` targets are legal REAPI output;
the client decides whether to materialise them.
"""

from __future__ import annotations

from casbah.errors import FailedPrecondition, InvalidTree

#: Hostile names are echoed in errors: cut to this many characters.
_ECHO = 200


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one entry of a Directory, or None if it can."""
    if not name:
        return "empty name"
    if name in (".", ".."):
        return f"name {echo(name)} is not allowed"
    if "/" in name:
        return "name contains '/' (a child must be exactly one path segment)"
    if "\0" in name:
        return "name contains NUL"
    return None


def directory_problem(directory) -> tuple[str, str] | None:
    """(entry name, reason) of the first rule `directory` breaks, or None.

    Checks every FileNode, DirectoryNode and SymlinkNode name, that each of the
    three lists is strictly sorted (Python compares str by code point, which is
    the REAPI's order, the same as UTF-8 bytes), and that no name repeats across
    the lists.  Every Directory of every tree served goes through here, so the
    common case is a few whole-list operations; only a failing Directory is
    walked entry by entry to name the culprit.
    """
    lists = (("file", [n.name for n in directory.files]), ("directory", [n.name for n in directory.directories]),
             ("symlink", [n.name for n in directory.symlinks]))
    everything = [name for _, names in lists for name in names]
    unique = set(everything)
    joined = "\x01".join(everything)
    if (len(unique) == len(everything) and "" not in unique and "." not in unique and ".." not in unique
            and "/" not in joined and "\0" not in joined and all(names == sorted(names) for _, names in lists)):
        return None
    return _first_problem(lists)


def _first_problem(lists) -> tuple[str, str] | None:
    seen: set[str] = set()
    for kind, names in lists:
        previous: str | None = None
        for name in names:
            if (reason := name_problem(name)) is not None:
                return name, f"{kind} {reason}"
            if name in seen:
                return name, f"{kind} name is used twice in the directory"
            seen.add(name)
            if previous is not None and name < previous:
                return name, f"{kind} entries are not sorted by name (the REAPI requires code point order)"
            previous = name
    return None


def echo(text: str) -> str:
    """`text` quoted for an error message, control characters escaped, bounded in length."""
    shown = repr(text[:_ECHO])
    return shown + ("…" if len(text) > _ECHO else "")


def check_directory(directory, path: str, where: str) -> None:
    """Raise InvalidTree naming the entry (its path in the tree) and `where` (the directory's digest)."""
    problem = directory_problem(directory)
    if problem is None:
        return
    name, reason = problem
    raise InvalidTree(f"entry {echo(join(path, name))} in directory {where}: {reason}")


def join(path: str, name: str) -> str:
    """The path of entry `name` inside the directory at `path` ("" is the tree's root)."""
    return f"{path}/{name}" if path else name


def output_path_problem(path: str, allow_empty: bool = False) -> str | None:
    """Why `path` cannot name an ActionResult output, or None.

    The REAPI makes output paths relative (no leading slash), `/`-separated, with
    no trailing slash; the empty path is allowed only for output directories (the
    whole working directory).  `..` segments and NUL are refused: an output must
    land inside the working directory.  `.` segments are left alone (harmless).
    """
    if not path:
        return None if allow_empty else "empty path"
    if "\0" in path:
        return "path contains NUL"
    if path.startswith("/"):
        return "path is absolute (REAPI output paths are relative)"
    segments = path.split("/")
    if any(not s for s in segments):
        return "path has an empty segment (a trailing or doubled '/')"
    if ".." in segments:
        return "path has a '..' segment"
    return None


def served(exc: InvalidTree) -> FailedPrecondition:
    """The error for a stored tree that fails the rules when a client asks for it.

    FAILED_PRECONDITION: the request is valid, the stored content is not in the
    state the call needs (and retrying will not change that until someone stores
    a valid tree).  Not DATA_LOSS: the blobs are intact, they hash to their digests.
    """
    return FailedPrecondition(f"stored tree fails the REAPI rules: {exc}")
