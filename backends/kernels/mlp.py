"""The whole gated MLP of one token in one launch (batch 1): gate/up GEMV, activation and down GEMV.

    a[r]   = act(rstd * sum_k G[r, k] x'[k]) * (rstd * sum_k U[r, k] x'[k])     x' = x (w + offset), RMSNorm folded
    out[j] += sum_r a[r] * D^T[r, j]                                            split over r: atomic fp32 additions

Program p owns `rows` consecutive intermediate rows: it streams its rows of G and U, computes its a[r] (rounded to
the model's dtype, as the two-launch path stores them), then streams the same rows of D^T (the down weight
transposed once at load, so each program's share is contiguous) and adds its partial sums into `out`. No program
waits for another, so the down projection needs neither its own launch nor the whole gate/up grid to finish first;
with about one program per SM the atomic additions are `programs x hidden` per layer.

`out` must not be the residual the kernel reads (programs still reading it would see others' additions): the
decoder adds it into the residual later (`FastDecoder`: the next layer's GEMV reads x + out, its attention output
projection adds out into the residual and clears it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.kernels.activation import ACTIVATIONS, apply_act, gated_torch
from backends.kernels import fast_int8, interpreting
from backends.kernels.gemv import launch_options, pdl_prologue, pdl_wait, prefetch_l2


@dataclass(frozen=True)
class MlpConfig:
    rows: int = 0  # intermediate rows per program (a multiple of 8); 0: about one program per SM
    block_k: int = 64  # columns of the gate/up tiles
    block_h: int = 128  # columns of the down tiles
    num_warps: int = 8
    num_stages: int = 4
    early_trigger: bool = False  # let the next kernel launch once the gate/up part is done (else: at the end)
    per_sm: int = 1  # programs per SM when `rows` is 0
    dot_gate_up: bool = False  # the products on the tensor cores (compiled only: the interpreter's bf16 dot is wrong)
    dot_down: bool = False
    prefetch_down: bool = False  # ask L2 for the program's D^T rows at its start (compiled, NVIDIA only)
    evict_first: bool = False  # gate/up tiles marked evict-first in L2 (keeps the prefetched D^T rows)


def rows_per_program(n: int, sms: int) -> int:
    """About one program per SM: ceil(n / sms) rounded up to a multiple of 8."""
    return max(8, triton.cdiv(triton.cdiv(n, sms), 8) * 8)


def fitting_tile(block: int, k: int) -> int:
    """`block` halved until it divides the hidden size `k` (at least 16 columns)."""
    while k % block and block > 16:
        block //= 2
    if k % block:
        raise ValueError(f"hidden size {k} is not a multiple of 16")
    return block


@triton.jit
def _row_dot(acc, xv, w, DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc += xv . w^T for one row vector xv [BK] and a tile w [R, BK]: DOT, on the tensor cores with xv as row 0 of
    a 16-row operand (acc [16, R], rows 1.. stay zero; no reduction per tile); else elementwise (acc [R, BK])."""
    if DOT:
        xq = tl.where((tl.arange(0, 16) == 0)[:, None], xv[None, :], 0.0).to(w.dtype)
        if IEEE:
            acc += tl.dot(xq, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xq, tl.trans(w))
    else:
        acc += w.to(tl.float32) * xv[None, :]
    return acc


@triton.jit
def _mlp_kernel(x_ptr, nw_ptr, g_ptr, u_ptr, dt_ptr, out_ptr, a_like_ptr, N, K, eps, norm_offset, rows,
                ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, ACT: tl.constexpr,
                EARLY: tl.constexpr, USE_PDL: tl.constexpr, DOT1: tl.constexpr, DOT2: tl.constexpr,
                IEEE: tl.constexpr, PF_DOWN: tl.constexpr, ROW_LINES: tl.constexpr, EVICT: tl.constexpr):
    r = tl.arange(0, ROWS)
    rn = tl.program_id(0) * rows + r
    nmask = (r < rows) & (rn < N)
    rk0 = tl.arange(0, BLOCK_K)
    if PF_DOWN:  # this program's rows of D^T into L2 now, so that they stream while the gate/up part runs
        LINE: tl.constexpr = 1024 // dt_ptr.dtype.element_ty.primitive_bitwidth
        line = tl.arange(0, ROW_LINES)
        line = tl.where(line * LINE < K, line, 0) * LINE
        prefetch_l2(dt_ptr + tl.where(nmask, rn, tl.program_id(0) * rows)[:, None] * K + line[None, :])
    # the weights never depend on the previous kernel: the first gate/up tiles are in flight while it finishes
    g0 = tl.load(g_ptr + rn[:, None] * K + rk0[None, :], mask=nmask[:, None], other=0.0, eviction_policy=EVICT)
    u0 = tl.load(u_ptr + rn[:, None] * K + rk0[None, :], mask=nmask[:, None], other=0.0, eviction_policy=EVICT)
    pdl_wait(USE_PDL)
    xv = tl.load(x_ptr + rk0).to(tl.float32)
    ss = xv * xv
    xv = xv * (tl.load(nw_ptr + rk0).to(tl.float32) + norm_offset)
    if DOT1:
        acc_g = tl.zeros([16, ROWS], tl.float32)
    else:
        acc_g = tl.zeros([ROWS, BLOCK_K], tl.float32)
    acc_u = acc_g
    acc_g = _row_dot(acc_g, xv, g0, DOT1, IEEE)
    acc_u = _row_dot(acc_u, xv, u0, DOT1, IEEE)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # K is a multiple of BLOCK_K (fitting_tile)
        rk = k0 + rk0
        xv = tl.load(x_ptr + rk).to(tl.float32)
        ss += xv * xv
        xv = xv * (tl.load(nw_ptr + rk).to(tl.float32) + norm_offset)
        g = tl.load(g_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None], other=0.0, eviction_policy=EVICT)
        u = tl.load(u_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None], other=0.0, eviction_policy=EVICT)
        acc_g = _row_dot(acc_g, xv, g, DOT1, IEEE)
        acc_u = _row_dot(acc_u, xv, u, DOT1, IEEE)
    if EARLY:
        pdl_prologue(USE_PDL)
    rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if DOT1:
        yg, yu = tl.sum(acc_g, axis=0), tl.sum(acc_u, axis=0)
    else:
        yg, yu = tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1)
    a = apply_act(yg * rstd, ACT) * (yu * rstd)
    a = tl.where(nmask, a.to(a_like_ptr.dtype.element_ty).to(tl.float32), 0.0)
    if DOT2:
        aq = tl.where((tl.arange(0, 16) == 0)[:, None], a[None, :], 0.0).to(a_like_ptr.dtype.element_ty)
    rh0 = tl.arange(0, BLOCK_H)
    for h0 in range(0, K, BLOCK_H):  # K is a multiple of BLOCK_H
        rh = h0 + rh0
        d = tl.load(dt_ptr + rn[:, None] * K + rh[None, :], mask=nmask[:, None], other=0.0)
        if DOT2:  # [16, ROWS] . [ROWS, BLOCK_H] on the tensor cores, a in row 0: the sum over rows inside the MMA
            if IEEE:
                y = tl.sum(tl.dot(aq, d, input_precision="ieee"), axis=0)
            else:
                y = tl.sum(tl.dot(aq, d), axis=0)
        else:
            y = tl.sum(d.to(tl.float32) * a[:, None], axis=0)
        tl.atomic_add(out_ptr + rh, y)
    if not EARLY:
        pdl_prologue(USE_PDL)


def mlp_(x: torch.Tensor, norm_w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor,
         out: torch.Tensor, *, eps: float = 1e-6, norm_offset: float = 0.0, act: str = "silu",
         config: MlpConfig | None = None, sms: int = 132, pdl: bool = False) -> torch.Tensor:
    """out (fp32 [K]) += D . a(x), a = act(G . rmsnorm(x)) * (U . rmsnorm(x)); x: fp32 [K] (not `out`); gate, up:
    [N, K]; down_t: the down weight transposed, [N, K] contiguous (D is [K, N]). `sms`: the GPU's SM count."""
    config = config or MlpConfig()
    n, k = gate.shape
    if up.shape != (n, k) or down_t.shape != (n, k) or not all(t.is_contiguous() for t in (gate, up, down_t)):
        raise ValueError(f"gate, up and the transposed down weight must be contiguous [{n}, {k}]")
    if x.numel() != k or out.numel() != k or out.dtype != torch.float32 or x.data_ptr() == out.data_ptr():
        raise ValueError(f"x and out must be [{k}], out fp32 and not x")
    block_k, block_h = fitting_tile(config.block_k, k), fitting_tile(config.block_h, k)
    rows = config.rows or rows_per_program(n, sms * config.per_sm)
    dot1, dot2 = (config.dot_gate_up, config.dot_down) if not interpreting() else (False, False)
    tile_rows = triton.next_power_of_2(rows)
    if dot1 or dot2:
        tile_rows = max(16, tile_rows)  # a tensor-core operand needs 16 (padding rows are masked: never loaded)
    _mlp_kernel[(triton.cdiv(n, rows),)](
        x, norm_w, gate, up, down_t, out, gate, n, k, eps, norm_offset, rows, ROWS=tile_rows,
        BLOCK_K=block_k, BLOCK_H=block_h, ACT=ACTIVATIONS[act], EARLY=config.early_trigger,
        USE_PDL=pdl, DOT1=dot1, DOT2=dot2, PF_DOWN=config.prefetch_down and fast_int8(gate.device),
        ROW_LINES=triton.next_power_of_2(triton.cdiv(k * down_t.element_size(), 128)),
        EVICT="evict_first" if config.evict_first else "",
        IEEE=gate.dtype == torch.float32, num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl))
    return out


def mlp_torch_(x, norm_w, gate, up, down_t, out, *, eps=1e-6, norm_offset=0.0, act="silu", config=None, sms=132,
               pdl=False):
    """The reference: the two-launch path's arithmetic (a rounded to the weights' dtype), in PyTorch."""
    from backends.kernels.norms import rmsnorm_torch

    xn = rmsnorm_torch(x.reshape(1, -1), norm_w, eps, norm_offset, out_dtype=gate.dtype)
    a = gated_torch(torch.nn.functional.linear(xn, gate), torch.nn.functional.linear(xn, up), act)
    out.add_((a.float() @ down_t.float()).reshape(-1))
    return out
