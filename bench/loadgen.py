"""Multi-process load generator.

One Python process cannot saturate a gRPC server: the GIL caps a synchronous grpcio
client at a few thousand calls a second, below what casd serves.  So the load comes
from several *spawned* processes (grpc does not survive fork), each with its own
channel, which stay alive for the whole run: spawning and importing grpc costs ~0.5 s
a process, and each keeps its test data and channels between phases.

A phase gives every participating worker one `Job`.  Each worker first runs
`job.prepare` (build requests, generate data: untimed), reports ready, and only when
all are ready does the parent send "go"; workers then run `job.run` and report their
own start and end times (CLOCK_MONOTONIC is system-wide on Linux, so times from
different processes compare).  The phase's wall time runs from the first start to the
last end, so ops/s = total ops / wall time counts stragglers honestly.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.context
import multiprocessing.queues
import queue
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from bench.common import BenchError, VerificationError, make_channel


class WorkerContext:
    """What a job can keep in its worker process between phases."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.cache: dict[Any, Any] = {}
        # Data that does not depend on the server (big random bodies) survives `reset`.
        self.keep: dict[Any, Any] = {}
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, address: str) -> grpc.Channel:
        """A channel to `address`, opened once per worker and reused: connection setup is
        not what we measure."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = make_channel(address)
        return channel

    def reset(self) -> None:
        """Forget channels and cached data, e.g. when moving to another target."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self.cache.clear()


@dataclass
class JobResult:
    """What one worker did in one phase.  `latencies` are seconds, one per operation
    (`kinds` optionally names the operation type for each)."""

    ops: int = 0
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    kinds: dict[str, list[float]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    start: float = 0.0
    end: float = 0.0
    cpu: float = 0.0  # the worker's CPU seconds (all threads) during run: is the client the bottleneck?


class Job(Protocol):
    """A picklable unit of work run in a worker process."""

    def prepare(self, ctx: WorkerContext) -> None:
        """Untimed setup: build requests, generate data."""

    def run(self, ctx: WorkerContext) -> JobResult:
        """The timed part.  Must be bounded in count and time, and raise on any wrong answer."""
        ...


@dataclass
class PhaseResult:
    """The aggregate of one phase over all its workers."""

    wall: float
    results: list[JobResult]
    server_cpu: float | None = None  # filled in by the caller, which knows the server

    @property
    def ops(self) -> int:
        return sum(r.ops for r in self.results)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.results)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall if self.wall > 0 else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.wall if self.wall > 0 else 0.0

    def latencies(self, kind: str | None = None) -> list[float]:
        out: list[float] = []
        for r in self.results:
            out.extend(r.latencies if kind is None else r.kinds.get(kind, []))
        return out

    @property
    def client_cpu(self) -> float:
        return sum(r.cpu for r in self.results)

    def counter(self, name: str) -> int:
        return sum(r.counters.get(name, 0) for r in self.results)


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; 0.0 without samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# --------------------------------------------------------------------------- worker side


def _worker_main(index: int, inbox: multiprocessing.queues.Queue, outbox: multiprocessing.queues.Queue) -> None:
    """Serve commands until told to stop.  Every failure goes back to the parent as text,
    because an exception cannot be raised across processes."""
    # Ctrl-C reaches the whole process group; the parent decides how to wind down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = WorkerContext(index)
    job: Job | None = None
    while True:
        command, payload = inbox.get()
        try:
            if command == "stop":
                ctx.reset()
                outbox.cancel_join_thread()  # exit even if the parent no longer reads
                return
            if command == "reset":
                ctx.reset()
                outbox.put((index, "reset", None))
            elif command == "prepare":
                job = payload
                assert job is not None
                job.prepare(ctx)
                outbox.put((index, "ready", None))
            elif command == "go":
                assert job is not None
                start = time.monotonic()
                cpu = time.process_time()
                result = job.run(ctx)
                result.cpu = time.process_time() - cpu
                result.end = result.end or time.monotonic()
                result.start = result.start or start
                job = None
                outbox.put((index, "done", result))
        except BaseException as err:  # reported to the parent, which raises
            job = None
            if isinstance(err, VerificationError):
                outbox.put((index, "verify", str(err)))
            elif isinstance(err, BenchError):
                outbox.put((index, "error", str(err)))
            else:  # a bug in the bench itself: the traceback is what helps
                outbox.put((index, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


# --------------------------------------------------------------------------- parent side


class LoadGenerator:
    """A pool of persistent worker processes, grown on demand."""

    def __init__(self) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._workers: list[tuple[multiprocessing.context.SpawnProcess, multiprocessing.queues.Queue]] = []
        self._outbox: multiprocessing.queues.Queue = self._mp.Queue()

    def _ensure(self, count: int) -> None:
        while len(self._workers) < count:
            inbox: multiprocessing.queues.Queue = self._mp.Queue()
            proc = self._mp.Process(
                target=_worker_main,
                args=(len(self._workers), inbox, self._outbox),
                name=f"bench-loadgen-{len(self._workers)}",
                daemon=True,
            )
            proc.start()
            self._workers.append((proc, inbox))

    def _collect(self, count: int, expect: str, timeout: float, skip_stale: bool = False) -> dict[int, Any]:
        """Wait for `count` replies of kind `expect`; raise on the first failure (or, with
        `skip_stale`, ignore replies left over from an abandoned phase)."""
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise BenchError(f"load generator: timed out after {timeout:.0f}s waiting for '{expect}'")
            try:
                index, kind, payload = self._outbox.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p.name for p, _ in self._workers if not p.is_alive()]
                if dead:
                    self.close()
                    raise BenchError(f"load generator: worker(s) died: {', '.join(dead)}") from None
                continue
            if skip_stale and kind != expect:
                continue
            if kind in ("error", "verify"):
                # Let the other workers finish so the pool stays usable for the next phase.
                self._drain(count - len(replies) - 1, timeout=max(5.0, deadline - time.monotonic()))
                detail = f"worker {index}: {payload}"
                if kind == "verify":
                    raise VerificationError(detail)
                raise BenchError(detail)
            if kind != expect:
                raise BenchError(f"load generator: unexpected reply {kind!r} from worker {index}")
            replies[index] = payload
        return replies

    def _drain(self, count: int, timeout: float) -> None:
        """Swallow the remaining replies of a failed step so they do not leak into the next."""
        deadline = time.monotonic() + timeout
        got = 0
        while got < count and time.monotonic() < deadline:
            try:
                self._outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            got += 1
        if got < count:
            self.close()

    def run(self, jobs: list[Job], timeout: float = 600.0, prepare_timeout: float = 600.0) -> PhaseResult:
        """Run one phase: every job in its own worker, started together."""
        self._ensure(len(jobs))
        for (_, inbox), job in zip(self._workers, jobs, strict=False):
            inbox.put(("prepare", job))
        try:
            self._collect(len(jobs), "ready", prepare_timeout)
        except BenchError:
            # Workers that did prepare still hold a job; clear them so the pool stays in step.
            self.reset()
            raise
        for _, inbox in self._workers[: len(jobs)]:
            inbox.put(("go", None))
        replies = self._collect(len(jobs), "done", timeout)
        results: list[JobResult] = [replies[i] for i in sorted(replies)]
        wall = max(r.end for r in results) - min(r.start for r in results)
        return PhaseResult(wall=wall, results=results)

    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self._workers if proc.pid is not None]

    def reset(self) -> None:
        """Close every worker's channels and drop cached data (between targets)."""
        for _, inbox in self._workers:
            inbox.put(("reset", None))
        try:
            self._collect(len(self._workers), "reset", 60.0, skip_stale=True)
        except BenchError:
            self.close()

    def close(self) -> None:
        """Stop every worker: politely, then, after 3 s in all (a worker may be mid-job, or
        blocked writing results nobody will read), by SIGKILL."""
        for proc, inbox in self._workers:
            if proc.is_alive():
                try:
                    inbox.put(("stop", None))
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 3.0
        for proc, _ in self._workers:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc, _ in self._workers:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._workers.clear()
