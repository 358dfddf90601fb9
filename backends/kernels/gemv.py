"""Batch-1 matrix-vector products that read each weight once, at as much of the memory bandwidth as we can get.

    y[n] = sum_k W[n, k] * x'[k]        x' = x, or RMSNorm(x) * (norm_w + offset) when `norm_w` is given
    gated: y[n] = act(sum_k W[n, k] x'[k]) * sum_k U[n, k] x'[k]      (SwiGLU / GeGLU fused into the epilogue)
    accumulate: out[n] += y[n]          atomically, so split-K partial sums land straight in the fp32 residual
    int8 weights: W[n, k] = q[n, k] * s[n] (backends/quantize.py); the kernel streams q and scales each row's sum

One program owns BLOCK_N output rows and 1/SPLIT_K of the reduction; it streams [BLOCK_N, BLOCK_K] weight tiles
(contiguous along K) and keeps an fp32 [BLOCK_N, BLOCK_K] accumulator, reduced once at the end. RMSNorm costs no
extra pass: y = rstd * sum_k W[n, k] (x[k] (w[k] + offset)), and with SPLIT_K = 1 the program sees all of x, so the
sum of squares accumulates in the same loop (a split program computes it in a short prologue instead). With
SPLIT_K = 1 the result is deterministic; with SPLIT_K > 1 the fp32 additions happen in arrival order.

Programmatic dependent launch (Hopper; `pdl=True`): the kernel lets its successor launch early and, before waiting
for its predecessor (`gdc_wait`), prefetches its own weight slice into L2: weights never depend on the previous
kernel, so the memory system streams them while the small kernels before it (attention, rope) run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.kernels import fast_int8
from backends.kernels.activation import ACTIVATIONS, apply_act


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    preload: bool = False  # load the first weight tile before waiting for the previous kernel (see gemv())


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the 128-byte lines at `ptrs` to be brought into L2 (no registers written)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def widen(w, FAST_I8: tl.constexpr):
    """A loaded weight tile as fp32. FAST_I8 (int8 tiles, compiled for NVIDIA): through the float's bits rather than
    the int-to-float unit, which on an H100/H200 converts 16 values per clock per SM, the rate at which a GEMV
    streaming int8 at full bandwidth needs them. Per 4 bytes: flip each sign bit (b + 128, unsigned), place each
    byte under the exponent of 2^23 (the float 2^23 + 128 + b, exact), subtract 2^23 + 128."""
    if FAST_I8:
        bits = tl.inline_asm_elementwise(
            "{ .reg .b32 t, k; xor.b32 t, $4, 0x80808080; mov.b32 k, 0x4B000000; prmt.b32 $0, t, k, 0x7440; "
            "prmt.b32 $1, t, k, 0x7441; prmt.b32 $2, t, k, 0x7442; prmt.b32 $3, t, k, 0x7443; }",
            "=r,=r,=r,=r,r", [w], dtype=tl.int32, is_pure=True, pack=4)
        return bits.to(tl.float32, bitcast=True) - 8388736.0
    else:
        return w.to(tl.float32)


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, u_ptr, nw_ptr, out_ptr, amax_ptr, aidx_ptr, ws_ptr, us_ptr, N, K, stride_w, eps,
                 norm_offset, k_per_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr, GATED: tl.constexpr,
                 ACT: tl.constexpr, ACCUMULATE: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr,
                 USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, k_prefetch, PRELOAD: tl.constexpr,
                 TRIGGER: tl.constexpr, ARGMAX: tl.constexpr, SCALED: tl.constexpr,
                 FAST_I8: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    k_start = pid_k * k_per_split
    if PREFETCH:
        # one address per 128-byte line of the first k_prefetch columns of this program's weight slice
        LINE: tl.constexpr = 128 // w_ptr.dtype.element_ty.primitive_bitwidth * 8
        for i in range(0, k_prefetch, BLOCK_K):
            lines = k_start + i + tl.arange(0, BLOCK_K // LINE) * LINE
            prefetch_l2(w_ptr + rn[:, None] * stride_w + lines[None, :])
            if GATED:
                prefetch_l2(u_ptr + rn[:, None] * stride_w + lines[None, :])
    if TRIGGER == 0:
        pdl_prologue(USE_PDL)
    if PRELOAD:  # weights never depend on the previous kernel: have the first tile in flight while waiting
        rk0 = k_start + tl.arange(0, BLOCK_K)
        w_first = tl.load(w_ptr + rn[:, None] * stride_w + rk0[None, :], mask=nmask[:, None] & (rk0 < K)[None, :],
                          other=0.0)
        if GATED:
            u_first = tl.load(u_ptr + rn[:, None] * stride_w + rk0[None, :],
                              mask=nmask[:, None] & (rk0 < K)[None, :], other=0.0)
    pdl_wait(USE_PDL)
    if HAS_NORM and SPLIT:
        ss_pre = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            ss_pre += xv * xv
        rstd = tl.rsqrt(tl.sum(ss_pre, axis=0) / K + eps)
    ss = tl.zeros([BLOCK_K], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if GATED:
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if PRELOAD:
        rk = rk0
        xv = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        if HAS_NORM:
            if not SPLIT:
                ss += xv * xv
            xv = xv * (tl.load(nw_ptr + rk, mask=rk < K, other=0.0).to(tl.float32) + norm_offset)
        acc += widen(w_first, FAST_I8) * xv[None, :]
        if GATED:
            acc_u += widen(u_first, FAST_I8) * xv[None, :]
    for i in range(BLOCK_K if PRELOAD else 0, k_per_split, BLOCK_K):  # bounds from arguments (the interpreter
        rk = k_start + i + tl.arange(0, BLOCK_K)                        # needs that)
        if TRIGGER == 1:
            if i == k_per_split - BLOCK_K:
                pdl_prologue(USE_PDL)
        if EVEN:
            xv = tl.load(x_ptr + rk).to(tl.float32)
            if HAS_NORM:
                if not SPLIT:
                    ss += xv * xv
                xv = xv * (tl.load(nw_ptr + rk).to(tl.float32) + norm_offset)
            w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :])
            if GATED:
                u = tl.load(u_ptr + rn[:, None] * stride_w + rk[None, :])
        else:
            kmask = rk < K
            xv = tl.load(x_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
            if HAS_NORM:
                if not SPLIT:
                    ss += xv * xv
                xv = xv * (tl.load(nw_ptr + rk, mask=kmask, other=0.0).to(tl.float32) + norm_offset)
            wmask = nmask[:, None] & kmask[None, :]
            w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=wmask, other=0.0)
            if GATED:
                u = tl.load(u_ptr + rn[:, None] * stride_w + rk[None, :], mask=wmask, other=0.0)
        acc += widen(w, FAST_I8) * xv[None, :]
        if GATED:
            acc_u += widen(u, FAST_I8) * xv[None, :]
    if TRIGGER == 2:
        pdl_prologue(USE_PDL)  # the next kernel may launch now: this one only has its epilogue left
    y = tl.sum(acc, axis=1)
    if GATED:
        y_u = tl.sum(acc_u, axis=1)
    if SCALED:  # int8 rows: W[n, :] = q[n, :] * s[n], so the row's scale multiplies its sum once
        y = y * tl.load(ws_ptr + rn, mask=nmask, other=0.0)
        if GATED:
            y_u = y_u * tl.load(us_ptr + rn, mask=nmask, other=0.0)
    if HAS_NORM:
        if not SPLIT:
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        y = y * rstd
        if GATED:
            y_u = y_u * rstd
    if GATED:
        y = apply_act(y, ACT) * y_u
    if ACCUMULATE:
        tl.atomic_add(out_ptr + rn, y, mask=nmask)
    else:
        y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rn, y, mask=nmask)
    if ARGMAX:  # this program's largest output and its first row (NaN counts as the largest, as in torch.argmax)
        v = y.to(tl.float32)
        v = tl.where(nmask, tl.where(v != v, float("inf"), v), float("-inf"))
        top = tl.max(v, axis=0)
        tl.store(amax_ptr + pid_n, top)
        tl.store(aidx_ptr + pid_n, tl.min(tl.where(nmask & (v == top), rn, N), axis=0))


def default_config(n: int, k: int, gated: bool, accumulate: bool, itemsize: int = 2) -> GemvConfig:
    """One config per kind of GEMV, each within 2% of the per-shape best on an H100 (benchmarks/gemv_tune.py,
    bf16, every linear shape of Llama-3.2-1B and Qwen3-1.7B, programmatic dependent launch; BENCHMARKS.md): narrow
    programs with long K tiles, 8 warps, 4-stage pipelines, the first tile loaded before the dependency wait; the
    GEMVs that accumulate into the residual (few output rows, long K) split K four ways.

    `itemsize` 1 (int8 weights): the same tiles in bytes, i.e. twice the columns where K allows it."""
    wide = 2 if itemsize == 1 else 1

    def widest(*sizes):
        sizes = tuple(b * wide for b in sizes[:1]) + sizes if wide > 1 else sizes
        return next((b for b in sizes if k % b == 0), sizes[-1])

    if accumulate:  # only an fp32 accumulating output can take split-K partial sums
        block_k = widest(256)
        split = 4 if k % (block_k * 4) == 0 else 1
        return GemvConfig(block_n=16, block_k=block_k, split_k=split, num_warps=8, num_stages=3, preload=True)
    if gated:
        return GemvConfig(block_n=8, block_k=widest(512, 256, 128), num_warps=8, num_stages=4, preload=True)
    if n >= 16 * k:  # the vocabulary projection: 4-warp programs over 512-wide tiles read it at 97% of the copy
        # bandwidth on an H200 against 91% for the config below (126.8 vs 134.7 us, Llama-3.2-1B's head)
        return GemvConfig(block_n=8, block_k=widest(512, 256, 128), num_warps=4, num_stages=4, preload=True)
    return GemvConfig(block_n=8, block_k=widest(1024, 512, 256, 128), num_warps=8, num_stages=4, preload=True)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, norm_w: torch.Tensor | None = None,
         eps: float = 1e-6, norm_offset: float = 0.0, up: torch.Tensor | None = None, act: str = "silu",
         accumulate: bool = False, config: GemvConfig | None = None, pdl: bool = False,
         prefetch: bool = False, preload: bool | None = None, trigger: str = "end",
         argmax: tuple[torch.Tensor, torch.Tensor] | None = None, scale: torch.Tensor | None = None,
         up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [K] or [1, K]; w (and up): [N, K] contiguous; out: [N] (fp32 when accumulating).

    `scale` (and `up_scale` with `up`): fp32 [N] row scales of int8 weights `w` (and `up`), as
    `backends.quantize.quantize_rows` makes them; int8 weights need them.

    `argmax` (fp32 and int32 buffers of `argmax_blocks(...)` entries): each program also writes the largest of its
    outputs and the first row holding it, for `step.advance_(pick=...)` to finish the argmax without another pass.

    `pdl` (Hopper, compiled kernels only) launches with programmatic dependent launch; `prefetch` also streams
    this kernel's weights into L2 before waiting for the previous kernel.
    """
    n, k = w.shape
    if accumulate and out.dtype != torch.float32:
        raise ValueError("accumulate=True needs an fp32 output")
    scaled = scale is not None
    if scaled != (w.dtype == torch.int8) or (up is not None and (up_scale is not None) != scaled):
        raise ValueError("int8 weights need their row scales (scale=, and up_scale= with up=), others none")
    if scaled and (scale.shape != (n,) or scale.dtype != torch.float32 or
                   (up is not None and (up.dtype != torch.int8 or up_scale.shape != (n,)))):
        raise ValueError(f"row scales must be fp32 [{n}] and both weights int8")
    config = config or default_config(n, k, up is not None, accumulate, w.element_size())
    preload = config.preload if preload is None else preload
    split = config.split_k if accumulate else 1
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    even = n % config.block_n == 0 and k % (config.block_k * split) == 0 and k_per_split * split == k
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(k, k_per_split))
    # prefetch at most PREFETCH_BYTES of this kernel's weights (L2 is 50 MB on an H100)
    row_bytes = w.element_size() * n * (2 if up is not None else 1)
    k_prefetch = min(k_per_split, max(config.block_k, PREFETCH_BYTES // row_bytes // config.block_k * config.block_k))
    if argmax is not None and (accumulate or split > 1 or argmax[0].numel() != grid[0]):  # advance_ reads them all
        raise ValueError("argmax needs a non-accumulating GEMV and one entry per row block")
    amax, aidx = argmax if argmax is not None else (out, out)
    _gemv_kernel[grid](x, w, up if up is not None else w, norm_w if norm_w is not None else x, out, amax, aidx,
                       scale if scaled else out, up_scale if up_scale is not None else out, n, k,
                       w.stride(0), eps, norm_offset, k_per_split,
                       BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_NORM=norm_w is not None,
                       GATED=up is not None, ACT=ACTIVATIONS[act], ACCUMULATE=accumulate, EVEN=even,
                       SPLIT=grid[1] > 1, USE_PDL=pdl, PREFETCH=pdl and prefetch, k_prefetch=k_prefetch,
                       PRELOAD=preload, TRIGGER=TRIGGERS[trigger], ARGMAX=argmax is not None, SCALED=scaled,
                       FAST_I8=scaled and fast_int8(w.device),
                       num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl))
    return out


def argmax_blocks(n: int, k: int, config: GemvConfig | None = None, itemsize: int = 2) -> int:
    """How many (max, row) pairs `gemv(..., argmax=...)` writes for an [n, k] weight: one per row block."""
    return triton.cdiv(n, (config or default_config(n, k, False, False, itemsize)).block_n)


PREFETCH_BYTES = 16 * 2**20
TRIGGERS = {"start": 0, "last": 1, "end": 2}


def launch_options(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


def gemv_torch(x, w, out, *, norm_w=None, eps=1e-6, norm_offset=0.0, up=None, act="silu", accumulate=False,
               config=None, pdl=False, prefetch=False, preload=None, trigger="end", scale=None, up_scale=None,
               dtype=None):
    """The reference; int8 weights are dequantized to `dtype` (the activations' dtype) first."""
    from backends.kernels.activation import gated_torch
    from backends.kernels.norms import rmsnorm_torch
    from backends.quantize import dequantize_rows

    if scale is not None:
        w = dequantize_rows(w, scale, dtype)
        up = dequantize_rows(up, up_scale, dtype) if up is not None else None
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
