"""Run points, ordered so that every model is loaded once.

A point is one (model, backend, precision, attention, kernels) x test x batch x threads x sync_every. Points that
share the first five share a loaded runner (a `LoadKey`); groups run in the order their first point appears in the
sweep (model outermost), and inside a group by test (as given), then batch ascending (so that an out-of-memory
batch ends its test's sweep), then threads and sync_every.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from portable.bench.spec import SweepSpec, TestSpec

GPU_BACKENDS = ("cuda", "rocm")
GPU_SYNC_EVERY = 16


def sync_every_for(backend: str) -> int:
    """The default read-back interval: a GPU step sequence is timed whole, with a synchronisation every 16 steps
    (seed 000 times the whole loop; per-step syncs would time the launch gaps). Elsewhere there is no device queue
    to drain, so every step is read back and timed on its own (true per-step P50/P95)."""
    return GPU_SYNC_EVERY if backend in GPU_BACKENDS else 1


@dataclass(frozen=True)
class LoadKey:
    """What a loaded runner is: changing any of these means loading the model again."""

    model: str
    backend: str
    precision: str
    attn: str
    kernels: str
    compile: bool


@dataclass(frozen=True)
class RunPoint:
    key: LoadKey
    test: TestSpec
    batch: int
    threads: int | None
    sync_every: int

    @property
    def label(self) -> str:
        parts = [self.test.config or self.test.name, f"b{self.batch}", self.key.backend, self.key.precision]
        if self.threads:
            parts.append(f"t{self.threads}")
        return " ".join(parts)


def plan(spec: SweepSpec) -> list[tuple[LoadKey, list[RunPoint]]]:
    """The sweep's points grouped by loaded runner, in run order."""
    groups: dict[LoadKey, list[RunPoint]] = {}
    for model, backend, precision, attn, kernels in itertools.product(spec.models, spec.backends, spec.precisions,
                                                                       spec.attns, spec.kernels):
        key = LoadKey(model, backend, precision, attn, kernels, spec.compile)
        groups.setdefault(key, [])
    for key, points in groups.items():
        for test in spec.tests:
            for batch in sorted(spec.batches):
                for threads in spec.threads or (None,):
                    for sync_every in spec.sync_every or (sync_every_for(key.backend),):
                        points.append(RunPoint(key, test, batch, threads, sync_every))
    return list(groups.items())
