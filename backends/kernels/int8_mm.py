"""Small-batch products with int8 weights: the decode step's linear layers at batches 2 and up, under `--precision
int8`, reading each int8 weight once for the whole batch.

    y[m, n] = s[n] * sum_k x[m, k] q[n, k]        q int8 [N, K], s fp32 [N] (backends/quantize.py), x [M, K]

The batch-1 step streams the int8 rows through `gemv`; without this kernel a batch > 1 needed the weights in the
model's dtype too (the dense copy that made int8 hold more memory than bf16). One program owns BLOCK_M rows of x,
BLOCK_N output columns and 1/SPLIT_K of the reduction: it widens its [BLOCK_N, BLOCK_K] int8 tiles to x's dtype
(exact: |q| <= 127) and multiplies on the tensor cores (`tl.dot`, fp32 accumulation; fp32 inputs at IEEE precision).
Split-K partial sums are added atomically into the fp32 output, which must then start at zero (`int8_mm` zeroes it).

Unlike the batch-1 kernels, this one uses `tl.dot`: the CPU tests run it in Triton's interpreter at fp32 only (the
interpreter computes bf16 `tl.dot` wrongly); the bf16 path is tested on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MmConfig:
    block_m: int = 16
    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _int8_mm_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, stride_x, stride_q, stride_out, k_per_split,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                    IEEE: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        in_k = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
        q = tl.load(q_ptr + rn[:, None] * stride_q + rk[None, :], mask=(rn[:, None] < N) & in_k[None, :], other=0)
        w = q.to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    ptrs = out_ptr + rm[:, None] * stride_out + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(m: int, n: int, k: int) -> MmConfig:
    """From a sweep at batch 16 on an H200 (48 configs for each linear shape of Llama-3.2-1B and Qwen3-1.7B;
    BENCHMARKS.md): 32-column programs over 256-wide K tiles, 4 warps, 4 stages, no split were the fastest for every
    projection (Llama's qkv: 3 stages, 10.0 us); the down projections (K >= 3 N) split K four ways (Llama's: 14.4 us
    against 19.3 for the dense bf16 product); the vocabulary projections take 64 columns and 3 stages. The first
    defaults, which split K to fill the GPU, were up to 5.6x slower (Qwen3's qkv: 55.3 against 9.8 us)."""
    block_m = 16 if m <= 16 else 32
    if n >= 16 * k:
        return MmConfig(block_m=block_m, block_n=64, block_k=256, split_k=1, num_warps=4, num_stages=3)
    split = 4 if k >= 3 * n and k % (256 * 4) == 0 else 1
    return MmConfig(block_m=block_m, block_n=32, block_k=256, split_k=split, num_warps=4, num_stages=4)


def int8_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None,
            config: MmConfig | None = None) -> torch.Tensor:
    """x [M, K] (bf16, fp16 or fp32, rows contiguous) times the int8 weights q [N, K] with fp32 row scales s [N]:
    [M, N], fp32. `out` (fp32 [M, N], contiguous) is written in place."""
    m, k = x.shape
    n = q.shape[0]
    if q.dtype != torch.int8 or q.shape[1] != k or s.shape != (n,) or s.dtype != torch.float32:
        raise ValueError(f"int8_mm needs int8 weights [N, {k}] and fp32 scales [N]; got {q.dtype} {tuple(q.shape)} "
                         f"and {s.dtype} {tuple(s.shape)}")
    if x.stride(1) != 1 or q.stride(1) != 1:
        raise ValueError("int8_mm needs rows contiguous in x and q")
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    elif out.shape != (m, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"int8_mm's out must be fp32 [{m}, {n}], contiguous")
    config = config or default_config(m, n, k)
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(k, k_per_split), triton.cdiv(m, config.block_m))
    if grid[1] > 1:
        out.zero_()
    _int8_mm_kernel[grid](x, q, s, out, m, n, k, x.stride(0), q.stride(0), out.stride(0), k_per_split,
                          BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT=grid[1] > 1,
                          IEEE=x.dtype == torch.float32, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def int8_mm_torch(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None,
                  config: MmConfig | None = None) -> torch.Tensor:
    """The reference: the same sum in fp32, the scale applied to each column's sum."""
    y = (x.float() @ q.float().t()) * s
    return y if out is None else out.copy_(y)
