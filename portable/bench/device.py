"""The only place in `portable/` that calls `torch.cuda` (PyTorch reports ROCm GPUs as "cuda" too): what the harness
needs outside a runner — synchronising and emptying the allocator for the peer and between points, the copy
benchmark behind `--measure-peak`, and the profiler's activities. Every function takes the device and does nothing
GPU-specific for a CPU device.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Give freed memory back between points (seed 003 empties the CUDA cache between configurations)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """A failure to allocate: torch's OutOfMemoryError, a MemoryError, or a runtime error that says so (ONNX Runtime
    and torch's CPU allocator raise plain RuntimeErrors: "DefaultCPUAllocator: can't allocate memory ... Error code
    12 (Cannot allocate memory)")."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None), MemoryError) if t)
    if isinstance(error, oom_types):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        words in text for words in ("out of memory", "failed to allocate memory", "can't allocate memory",
                                    "cannot allocate memory"))


def name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from portable.environment import cpu_name

    return cpu_name()


def copy_bandwidth(device: torch.device, nbytes: int | None = None, copies: int = 10, rounds: int = 5) -> float:
    """Device memory bandwidth in GB/s from copying one buffer into another (each copy reads and writes `nbytes`):
    the median of `rounds` rounds of `copies` copies each, after a warm-up."""
    nbytes = nbytes or (2 * 1024**3 if device.type == "cuda" else 256 * 1024**2)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    for _ in range(3):
        dst.copy_(src)
    rates = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        synchronize(device)
        rates.append(2 * nbytes * copies / (time.perf_counter() - start) / 1e9)
    del src, dst
    release_memory(device)
    return statistics.median(rates)


def profiler_activities(device: torch.device) -> list:
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return activities


def gpu_available() -> bool:
    return torch.cuda.is_available()
