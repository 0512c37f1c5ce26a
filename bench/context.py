"""What every scenario shares: its Context and the figures it returns.

A module of its own so the scenario registry (`bench.scenarios`) and the scenarios
written in their own modules (`client_tree`, `http_cache`) import it, not each other.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.common import Dataset, slice_indices
from bench.jobs import BatchUpdateJob
from bench.loadgen import Job, LoadGenerator, PhaseResult
from bench.targets import Target, server_cpu_seconds

MiB = 1024 * 1024


@dataclass
class Metric:
    """One figure of a scenario, with every repeat's value; `higher_is_better` decides
    which way a ratio points."""

    name: str
    unit: str
    values: list[float]
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan


@dataclass
class ScenarioResult:
    metrics: list[Metric]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a scenario needs to know about the run and the target."""

    target: Target
    loadgen: LoadGenerator
    scale: float = 1.0
    repeat: int | None = None
    processes: int = 4
    clients: int = 8
    batch_limit: int = MiB
    seed: int = 1
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.target.address

    @property
    def instance(self) -> str:
        return self.target.instance

    def own_pids(self) -> list[int]:
        """Our processes: this one, the load generators and a managed server."""
        pids = [os.getpid(), *self.loadgen.pids()]
        if self.target.pid is not None:
            pids.append(self.target.pid)
        return pids + self.target.service_pids()  # a scale-out target's S3/Redis/PostgreSQL servers

    def scaled(self, n: float, minimum: int = 1) -> int:
        return max(minimum, round(n * self.scale))

    def repeats(self, default: int) -> int:
        return max(1, self.repeat if self.repeat is not None else default)

    def new_seed(self, tag: str) -> int:
        """A dataset seed unique to this run, target and purpose: data a server (even a
        long-running external one) has never seen."""
        digest = hashlib.sha256(f"{self.seed}/{self.target.name}/{tag}".encode()).digest()
        return int.from_bytes(digest[:7], "little")

    def phase(self, jobs: list[Job], label: str, timeout: float = 900.0) -> PhaseResult:
        """Run one load-generator phase and note the server CPU it cost."""
        cpu0 = server_cpu_seconds(self.target)
        result = self.loadgen.run(jobs, timeout=timeout)
        cpu1 = server_cpu_seconds(self.target)
        if cpu0 is not None and cpu1 is not None:
            result.server_cpu = cpu1 - cpu0
        self.phases.append({
            "phase": label,
            "wall_s": round(result.wall, 4),
            "ops": result.ops,
            "bytes": result.bytes,
            "server_cpu_s": None if result.server_cpu is None else round(result.server_cpu, 3),
            "client_cpu_s": round(result.client_cpu, 3),
        })
        return result

    def upload(self, dataset: Dataset, label: str) -> PhaseResult:
        """Untimed setup: upload a dataset with BatchUpdateBlobs from all load processes."""
        parts = min(self.processes, dataset.count)
        jobs: list[Job] = [
            BatchUpdateJob(self.address, self.instance, dataset, r.start, r.stop, self.batch_limit)
            for r in (slice_indices(dataset.count, parts, p) for p in range(parts))
        ]
        return self.phase(jobs, f"setup: {label}")
