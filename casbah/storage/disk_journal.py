"""The journal that keeps several processes' disk indexes in step (`serve --workers N`).

Each worker keeps its own in-memory index of a shared data directory.  What one
worker adds (`+key size`) or evicts/deletes (`-key`) it appends to
`<root>/journal` (O_APPEND: lines of a few dozen bytes land whole), and every
worker replays the lines it has not seen yet twice a second, all in one thread
hop.  A read that misses the index also checks the file itself, so a blob
another worker stored a moment ago is served even before its line is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from casbah.digest import Digest

log = logging.getLogger(__name__)

SYNC_INTERVAL = 0.5


class Journal:
    def __init__(self, path: Path, parse_key: Callable[[str], Digest | None]) -> None:
        self.path = path
        self._parse = parse_key
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._offset = os.fstat(self._fd).st_size  # the startup scan saw everything before this
        self._pending: list[str] = []
        self._task: asyncio.Task | None = None

    def note_added(self, digest: Digest, size: int) -> None:
        self._pending.append(f"+{digest.key} {size}\n")

    def note_removed(self, digest: Digest) -> None:
        self._pending.append(f"-{digest.key}\n")

    def start(self, apply: Callable[[list[tuple[str, Digest, int]]], None]) -> None:
        if self._task is None:
            with contextlib.suppress(RuntimeError):
                self._task = asyncio.get_running_loop().create_task(self._loop(apply))

    async def _loop(self, apply: Callable[[list[tuple[str, Digest, int]]], None]) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                await self.sync(apply)
            except OSError as exc:
                log.warning("disk journal %s: %s", self.path, exc)

    async def sync(self, apply: Callable[[list[tuple[str, Digest, int]]], None]) -> None:
        """Write our pending lines, read everyone's new ones, apply them on the loop."""
        pending, self._pending = self._pending, []
        entries = await asyncio.to_thread(self._exchange, "".join(pending).encode())
        if entries:
            apply(entries)

    def _exchange(self, out: bytes) -> list[tuple[str, Digest, int]]:
        if out:
            os.write(self._fd, out)
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being appended right now is read next time
        self._offset += end
        entries = []
        for line in data[:end].decode(errors="replace").splitlines():
            op, _, rest = line.partition(" ") if line.startswith("+") else (line, "", "")
            digest = self._parse(op[1:])
            if digest is None:
                continue
            entries.append((op[0], digest, int(rest) if rest.isdigit() else 0))
        return entries

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._pending:
            os.write(self._fd, "".join(self._pending).encode())
            self._pending = []
        os.close(self._fd)
