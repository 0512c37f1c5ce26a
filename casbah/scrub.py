"""Scrubbing: re-hash every stored blob and remove the ones that no longer match.

Bit rot, a bad disk, or somebody editing files under the data directory would
otherwise be served to every build forever: writes are verified, reads are not
(hashing every read would halve throughput).  Scrubbing is the read-side check,
run by an operator (or a timer) at a bounded rate so it does not starve builds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from casbah import humanize
from casbah.digest import Digest
from casbah.errors import BlobNotFound, CasbahError, DataLoss, DigestMismatch
from casbah.storage.base import Storage
from casbah.streams import Verifier

log = logging.getLogger(__name__)


@dataclass
class ScrubReport:
    scanned: int = 0
    bytes: int = 0
    corrupt: list[Digest] = field(default_factory=list)
    #: Blobs that could not be read at all (an I/O error, a backend refusing): not removed.
    unreadable: list[tuple[Digest, str]] = field(default_factory=list)
    removed: int = 0
    vanished: int = 0  # evicted or deleted while the scrub ran
    seconds: float = 0.0

    def line(self) -> str:
        return (f"scanned {self.scanned} blobs ({humanize.size(self.bytes)}) in {humanize.duration(self.seconds)}: "
                f"{len(self.corrupt)} corrupt, {self.removed} removed, {self.vanished} vanished meanwhile"
                + (f", {len(self.unreadable)} unreadable" if self.unreadable else ""))


class RateLimiter:
    """Keeps a byte rate under `rate` per second (0 = unlimited) by sleeping."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    async def spend(self, n: int) -> None:
        self.done += n
        if self.rate:
            ahead = self.done / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                await asyncio.sleep(ahead)


def _disk_engine(storage: Storage) -> Any:
    """The engine under a `disk` node (seen through the metrics wrapper), if that is what this is."""
    inner = storage
    while type(inner).__name__ == "MetricsStorage":
        inner = inner.inner  # type: ignore[attr-defined]
    return getattr(inner, "engine", None)


async def scrub(storage: Storage, rate: int = 0, remove: bool = True,
                on_blob: Callable[[ScrubReport], None] | None = None) -> ScrubReport:
    report = ScrubReport()
    engine = _disk_engine(storage)
    if engine is not None:  # the engine scrubs itself: without dropping what a dry run only reports
        started = time.monotonic()
        checked, done, corrupt = await asyncio.to_thread(engine.scrub, rate, remove)
        report.scanned, report.bytes, report.corrupt = checked, done, corrupt
        report.removed = len(corrupt) if remove else 0
        report.seconds = time.monotonic() - started
        return report
    limiter = RateLimiter(rate)
    started = time.monotonic()
    async for info in storage.iterate():
        digest = info.digest
        verifier = Verifier(digest)
        try:
            stream = await storage.read(digest)
            async for chunk in stream:
                verifier.update(chunk)
                await limiter.spend(len(chunk))
            verifier.finish()
        except BlobNotFound:
            report.vanished += 1
            continue
        except (DigestMismatch, DataLoss) as exc:  # DataLoss: a verifying store caught it (and dropped it)
            report.corrupt.append(digest)
            log.warning("scrub: %s is corrupt: its stored bytes do not match it (%s)", digest,
                        str(exc).replace("upload for", "content of"))
            if remove:
                report.removed += await storage.delete([digest])
        except (CasbahError, OSError) as exc:  # one bad file must not end the scrub of the rest
            report.unreadable.append((digest, str(exc)))
            log.warning("scrub: %s cannot be read: %s", digest, exc)
            continue
        report.scanned += 1
        report.bytes += verifier.received
        if on_blob is not None:
            on_blob(report)
    report.seconds = time.monotonic() - started
    return report
