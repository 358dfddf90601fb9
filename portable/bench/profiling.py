"""`--profile DIR`: a PyTorch profiler Chrome trace of a few steps of a point (open it in https://ui.perfetto.dev).

The traced run is extra: it comes after the timed repetitions, decodes at most `run.PROFILE_STEPS` steps, and its
time is not part of any result.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from portable.bench import device as dev


def trace(device: torch.device, run_once: Callable[[], object], directory: Path, point) -> Path:
    from torch.profiler import profile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with profile(activities=dev.profiler_activities(device), record_shapes=True) as prof:
        run_once()
        dev.synchronize(device)
    path = directory / f"{trace_name(point)}.json"
    prof.export_chrome_trace(str(path))
    return path


def trace_name(point) -> str:
    """A file name made of every field a sweep varies, so that no two points of a sweep share a trace."""
    k, t = point.key, point.test
    parts = [k.model, t.config or t.name, f"b{point.batch}", k.backend, k.precision, k.attn, k.kernels,
             f"t{point.threads}" if point.threads else "", f"sync{point.sync_every}"]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(p for p in parts if p)).strip("_")
