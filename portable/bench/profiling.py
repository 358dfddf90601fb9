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
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{point.key.model}_{point.label}").strip("_")
    path = directory / f"{name}.json"
    prof.export_chrome_trace(str(path))
    return path
