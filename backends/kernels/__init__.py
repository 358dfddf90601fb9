"""Triton kernels for the GPU decode step, each next to the PyTorch reference it must match.

    norms.py       RMSNorm (standard and Gemma's 1 + w), residual-add + RMSNorm
    rope.py        rotary embedding of q and k in one kernel; the decode variant also applies Qwen3/Gemma3 q/k norms
                   and writes k and v into the static cache
    activation.py  SwiGLU / GeGLU
    gemv.py        batch-1 matrix-vector product streaming the weights once, with an RMSNorm prologue, a gated
                   activation epilogue, and split-K accumulation straight into the fp32 residual stream
    attention.py   single-token attention over a static cache (grouped-query, left padding, sliding windows)
    stream_gemv.py the same GEMVs for bf16/fp16 weights on NVIDIA sm_90+, not Triton: CUDA C++ (stream_gemv.cu)
                   compiled at run time by NVRTC, a producer warp bulk-copying the weights into shared memory; the
                   default there (faster on an H200, BENCHMARKS.md); tested against the reference on GPUs only
    int8_mm.py     batches > 1 with int8 weights (`--precision int8`): a small-batch product on the tensor cores
                   (`tl.dot`), each int8 weight read once for the batch

Every kernel reads bf16/fp16/fp32 and accumulates in fp32; the batch-1 kernels reduce matrix tiles with
multiply-and-sum rather than `tl.dot` (batch-1 work is bandwidth-bound, and the Triton interpreter, which runs these
kernels on CPU in CI, computes bf16 `tl.dot` wrongly; `int8_mm`'s `tl.dot` is therefore tested there at fp32 only).
`--kernels torch` swaps every kernel for its reference.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fast_int8(device) -> bool:
    """Whether the GEMVs may widen int8 weights with PTX byte permutes (gemv.widen): compiled, on NVIDIA."""
    import torch

    return device.type == "cuda" and not interpreting() and torch.version.hip is None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
