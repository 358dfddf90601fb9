"""Batch-1 matrix-vector products that read each weight once, at as much of the memory bandwidth as we can get.

    y[n] = sum_k W[n, k] * x'[k]        x' = x, or RMSNorm(x) * (norm_w + offset) when `norm_w` is given
    gated: y[n] = act(sum_k W[n, k] x'[k]) * sum_k U[n, k] x'[k]      (SwiGLU / GeGLU fused into the epilogue)
    accumulate: out[n] += y[n]          atomically, so split-K partial sums land straight in the fp32 residual

One program owns BLOCK_N output rows and 1/SPLIT_K of the reduction; it streams [BLOCK_N, BLOCK_K] weight tiles
(contiguous along K) and keeps an fp32 [BLOCK_N, BLOCK_K] accumulator, reduced once at the end. The RMSNorm prologue
recomputes the row's inverse RMS in every program (x is a few KiB and sits in L2), which is cheaper than a separate
launch. With SPLIT_K = 1 the result is deterministic; with SPLIT_K > 1 the fp32 additions happen in arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.kernels.activation import ACTIVATIONS, apply_act


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, u_ptr, nw_ptr, out_ptr, N, K, stride_w, eps, norm_offset, k_per_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr, GATED: tl.constexpr,
                 ACT: tl.constexpr, ACCUMULATE: tl.constexpr, EVEN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    if HAS_NORM:
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            ss += xv * xv
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if GATED:
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_start = pid_k * k_per_split
    for i in range(0, k_per_split, BLOCK_K):  # bounds from arguments only (the interpreter needs that)
        rk = k_start + i + tl.arange(0, BLOCK_K)
        if EVEN:
            xv = tl.load(x_ptr + rk).to(tl.float32)
            if HAS_NORM:
                xv = xv * rstd * (tl.load(nw_ptr + rk).to(tl.float32) + norm_offset)
            w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :])
            if GATED:
                u = tl.load(u_ptr + rn[:, None] * stride_w + rk[None, :])
        else:
            kmask = rk < K
            xv = tl.load(x_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
            if HAS_NORM:
                xv = xv * rstd * (tl.load(nw_ptr + rk, mask=kmask, other=0.0).to(tl.float32) + norm_offset)
            wmask = nmask[:, None] & kmask[None, :]
            w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=wmask, other=0.0)
            if GATED:
                u = tl.load(u_ptr + rn[:, None] * stride_w + rk[None, :], mask=wmask, other=0.0)
        acc += w.to(tl.float32) * xv[None, :]
        if GATED:
            acc_u += u.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, axis=1)
    if GATED:
        y = apply_act(y, ACT) * tl.sum(acc_u, axis=1)
    if ACCUMULATE:
        tl.atomic_add(out_ptr + rn, y, mask=nmask)
    else:
        tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=nmask)


def default_config(n: int, k: int, gated: bool, accumulate: bool, sms: int = 132) -> GemvConfig:
    block_n = 8 if gated else 16
    block_k = 512 if k >= 4096 else 256
    split = 1
    if accumulate:  # only an fp32 accumulating output can take split-K partial sums
        programs = triton.cdiv(n, block_n)
        while programs * split < 4 * sms and k // (block_k * split * 2) >= 1:
            split *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, norm_w: torch.Tensor | None = None,
         eps: float = 1e-6, norm_offset: float = 0.0, up: torch.Tensor | None = None, act: str = "silu",
         accumulate: bool = False, config: GemvConfig | None = None) -> torch.Tensor:
    """x: [K] or [1, K]; w (and up): [N, K] contiguous; out: [N] (fp32 when accumulating)."""
    n, k = w.shape
    if accumulate and out.dtype != torch.float32:
        raise ValueError("accumulate=True needs an fp32 output")
    config = config or default_config(n, k, up is not None, accumulate)
    split = config.split_k if accumulate else 1
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    even = n % config.block_n == 0 and k % (config.block_k * split) == 0 and k_per_split * split == k
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(k, k_per_split))
    _gemv_kernel[grid](x, w, up if up is not None else w, norm_w if norm_w is not None else x, out, n, k,
                       w.stride(0), eps, norm_offset, k_per_split,
                       BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_NORM=norm_w is not None,
                       GATED=up is not None, ACT=ACTIVATIONS[act], ACCUMULATE=accumulate, EVEN=even,
                       num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def gemv_torch(x, w, out, *, norm_w=None, eps=1e-6, norm_offset=0.0, up=None, act="silu", accumulate=False,
               config=None):
    from backends.kernels.activation import gated_torch
    from backends.kernels.norms import rmsnorm_torch

    x = x.reshape(1, -1)
    x = rmsnorm_torch(x, norm_w, eps, norm_offset, out_dtype=w.dtype) if norm_w is not None else x.to(w.dtype)
    y = torch.nn.functional.linear(x, w)
    if up is not None:
        y = gated_torch(y, torch.nn.functional.linear(x, up), act)
    y = y.reshape(-1)
    if accumulate:
        out.add_(y.float())
    else:
        out.copy_(y)
    return out
