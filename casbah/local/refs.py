"""Named refs of the local cache: `refs/<name>` holds `HASH/SIZE`; its mtime is the last use.

Names may contain `/` (they become directories).  A ref is replaced atomically (a
new file renamed over the old one), so a reader sees the old value or the new one.
Updates take an exclusive flock on `refs.lock`, so `set_ref(..., expected=old)` is a
true compare-and-swap across processes: two writers that both read `old` cannot both
win; the loser gets `Aborted` naming the value it lost to.  Readers take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from casbah.digest import Digest
from casbah.errors import Aborted, InvalidArgument, NotFound


class AnyValue:
    """The default `expected`: update whatever the ref holds."""

    def __repr__(self) -> str:
        return "ANY"


#: `expected=ANY`: no comparison; `expected=None`: the ref must not exist yet.
ANY: Final = AnyValue()


class Refs:
    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.dir = root / "refs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tmp = str(tmp)
        self._lock_path = root / "refs.lock"
        self._lock_path.touch(exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def path(self, name: str) -> Path:
        if not name or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
            raise InvalidArgument(f"invalid ref name {name!r}")
        return self.dir / name

    def _read(self, path: Path) -> Digest | None:
        try:
            return Digest.parse(path.read_text().strip())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def get(self, name: str) -> Digest | None:
        """The ref's digest, None if there is no such ref (no touch)."""
        return self._read(self.path(name))

    def set(self, name: str, digest: Digest, expected: Digest | AnyValue | None = ANY) -> None:
        """Point `name` at `digest`.  With `expected` (a digest, or None for "absent"),
        only if the ref still holds that: else `Aborted`, and the ref is unchanged."""
        path = self.path(name)
        with self._locked():
            if expected is not ANY:
                current = self._read(path)
                if current != expected:
                    now = "absent" if current is None else str(current)
                    was = "absent" if expected is None else str(expected)
                    raise Aborted(f"ref {name!r} changed meanwhile: expected {was}, found {now}")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{self._tmp}/ref-{os.getpid()}-{os.urandom(8).hex()}"
            with open(tmp, "w") as f:
                f.write(f"{digest.hash}/{digest.size}\n")
            os.replace(tmp, path)

    def resolve(self, name_or_digest: str, touch: bool = True) -> Digest:
        """A ref name, or a digest given as `HASH/SIZE`; `touch` marks the ref used (LRU)."""
        if "/" in name_or_digest:
            head, _, tail = name_or_digest.rpartition("/")
            if len(head) == 64 and tail.isdigit() and not (self.dir / name_or_digest).exists():
                return Digest.parse(name_or_digest)
        path = self.path(name_or_digest)
        digest = self._read(path)
        if digest is None:
            raise NotFound(f"no ref {name_or_digest!r} in {self.root}")
        if touch:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
        return digest

    def list(self) -> list[tuple[str, Digest, float]]:
        """(name, digest, last use), most recently used first."""
        out = []
        for dirpath, _, files in os.walk(self.dir):
            for name in files:
                full = Path(dirpath) / name
                try:
                    digest = Digest.parse(full.read_text().strip())
                    out.append((str(full.relative_to(self.dir)), digest, full.stat().st_mtime))
                except (FileNotFoundError, InvalidArgument):
                    continue
        out.sort(key=lambda item: item[2], reverse=True)
        return out

    def remove(self, name: str, expected: Digest | AnyValue = ANY) -> None:
        """Delete a ref (NotFound if absent; with `expected`, Aborted if it holds something else)."""
        path = self.path(name)
        with self._locked():
            if expected is not ANY:
                current = self._read(path)
                if current is not None and current != expected:
                    raise Aborted(f"ref {name!r} changed meanwhile: expected {expected}, found {current}")
            try:
                path.unlink()
            except (FileNotFoundError, IsADirectoryError):
                raise NotFound(f"no ref {name!r} in {self.root}") from None
            parent = path.parent  # under the lock: a concurrent `set` may need this directory
            while parent != self.dir:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
