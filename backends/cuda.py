"""CUDA backend: NVIDIA GPUs through a CUDA build of PyTorch (see backends/gpu.py for what it shares with ROCm)."""

from __future__ import annotations

import torch

from backends.gpu import TorchGpuBackend


class CudaBackend(TorchGpuBackend):
    name = "cuda"
    platform = "cuda"

    def build_matches(self) -> str | None:
        if getattr(torch.version, "hip", None):
            return "this PyTorch is a ROCm (HIP) build; use --backend rocm"
        if torch.version.cuda is None:
            return "this PyTorch build has no CUDA support (a CPU-only build)"
        return None
