"""What a result was measured on: versions, processor, GPU, project commit. Recorded in every report."""

from __future__ import annotations

import functools
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from portable import __version__


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def git_commit() -> str | None:
    return commit_of(Path(__file__).resolve().parent.parent)


def commit_of(root: Path) -> str | None:
    """The commit of the checkout whose top folder is `root`; None for an installed copy, whose site-packages may
    sit inside some other repository (a project's .venv) that git would otherwise answer for."""
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last `reset_peak_rss` (Linux), else since it started
    (Linux reports ru_maxrss in KiB; it follows the reset too)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def reset_peak_rss() -> bool:
    """Start the peak RSS afresh from the current RSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs resets the
    process's high-water mark); False where that is not possible, and the peak stays the process's whole life's.
    Memory freed earlier but still held by the C allocator is given back first (glibc's malloc_trim), so that it does
    not count in the next peak."""
    trim = _malloc_trim() if sys.platform.startswith("linux") else None
    if trim is not None:
        trim(0)
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def environment() -> dict:
    env = {
        "portable": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "triton": _version("triton"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": None,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
