"""ROCm backend: AMD GPUs through a ROCm (HIP) build of PyTorch, which reports them as "cuda" devices.

It differs from the CUDA backend only in the build it accepts and in the attention kernels available: FlashAttention-2
exists for ROCm only as AMD's fork (`flash_attn` built for ROCm); SDPA and eager run everywhere.
"""

from __future__ import annotations

import torch

from backends.gpu import TorchGpuBackend


class RocmBackend(TorchGpuBackend):
    name = "rocm"
    platform = "rocm"

    def build_matches(self) -> str | None:
        if getattr(torch.version, "hip", None):
            return None
        if torch.version.cuda is not None:
            return "this PyTorch is a CUDA build; use --backend cuda (ROCm needs PyTorch built for ROCm)"
        return "this PyTorch build has no ROCm support (a CPU-only build)"
