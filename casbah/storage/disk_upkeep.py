"""The `disk` backend's work behind requests: unlinks in order, last uses to mtimes.

Unlinks.  Eviction takes a blob out of the index at once (`DiskIndex.reserve`), but
its file is unlinked later, in a thread.  If a writer of the same blob renamed its
new file into place meanwhile, that late unlink would remove the new file and leave
the index naming a file that is gone.  So every unlink hop is recorded per digest
until it has finished, and a writer waits for the hops of its digests before
renaming.

Last uses.  The index records the time of each use; they are written to the files'
mtimes (what the startup scan orders by) in the background, at most once per
interval, and on close: last use survives a restart approximately, at the cost of
one `utime` per used blob per interval.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from typing import Any

from casbah.digest import Digest
from casbah.storage.disk_files import ObjectFiles
from casbah.storage.disk_index import DiskIndex


class UnlinkHops:
    def __init__(self) -> None:
        #: Digest -> the thread hop removing its file.
        self._pending: dict[Digest, asyncio.Future] = {}

    def start(self, victims: list[Digest], fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run `fn(*args)` (which unlinks `victims` first, then may do more, such as
        writing a batch) in a thread and return its future (await it shielded)."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        if victims:
            pending = self._pending
            for digest in victims:
                pending[digest] = future
            future.add_done_callback(functools.partial(self._done, victims))
        return future

    def _done(self, victims: list[Digest], future: asyncio.Future) -> None:
        pending = self._pending
        for digest in victims:
            if pending.get(digest) is future:
                del pending[digest]

    async def wait(self, digests: Iterable[Digest]) -> None:
        """Until every hop unlinking one of `digests` has finished (before a rename)."""
        pending = self._pending
        if not pending:
            return
        futures = {pending[d] for d in digests if d in pending}
        if futures:
            await asyncio.wait(futures)

    async def drain(self) -> None:
        """Until every hop started so far has finished (on close)."""
        if self._pending:
            await asyncio.wait(set(self._pending.values()))


class LastUseWriter:
    def __init__(self, index: DiskIndex, files: ObjectFiles) -> None:
        self._index = index
        self._files = files
        self._task: asyncio.Task | None = None

    def schedule(self, interval: float) -> None:
        """Flush in `interval` seconds, unless a flush is already due."""
        if self._task is None and self._index.has_touched:
            try:
                self._task = asyncio.get_running_loop().create_task(self._later(interval))
            except RuntimeError:  # no event loop (a synchronous caller): flushed on close
                pass

    async def _later(self, interval: float) -> None:
        await asyncio.sleep(interval)
        self._task = None
        await self.flush()

    async def flush(self) -> None:
        touched = self._index.take_touched()
        if touched:
            await asyncio.to_thread(self._files.utime_all, touched)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()
