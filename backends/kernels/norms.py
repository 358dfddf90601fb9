"""RMSNorm and residual-add + RMSNorm.

    rmsnorm(x, w)            y = x / sqrt(mean(x^2) + eps) * (w + offset)       offset 0 (Llama) or 1 (Gemma)
    add_rmsnorm_(x, r, w)    r += x (in place, in r's dtype); y = rmsnorm(r, w)    (pre-norm residual stream)
    rmsnorm_add_(x, r, w)    r += rmsnorm(x, w) (in place)                          (Gemma's post-norms)

Rows are normalised in fp32; y is written in `out_dtype`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


PLAIN, ADD_THEN_NORM, NORM_THEN_ADD = 0, 1, 2


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, n_cols, stride_x, stride_r, stride_y, eps, offset,
                    MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x + r
        tl.store(res_ptr + row * stride_r + cols, x.to(res_ptr.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(var + eps) * (w + offset)
    if MODE == 2:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_ptr + row * stride_r + cols, (r + y).to(res_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, w, eps, offset, out_dtype, mode):
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device) if mode != NORM_THEN_ADD else x2
    r2 = residual.reshape(-1, x.shape[-1]) if residual is not None else x2
    block = triton.next_power_of_2(x2.shape[-1])
    _rmsnorm_kernel[(x2.shape[0],)](x2, r2, w, y, x2.shape[-1], x2.stride(0), r2.stride(0), y.stride(0), eps,
                                    offset, MODE=mode, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return y.view(x.shape)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0, out_dtype=None) -> torch.Tensor:
    return _launch(x, None, w, eps, offset, out_dtype, PLAIN)


def add_rmsnorm_(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0,
                 out_dtype=None) -> torch.Tensor:
    """residual += x (in place); returns rmsnorm(residual). residual must be contiguous in its last dim."""
    return _launch(x, residual, w, eps, offset, out_dtype, ADD_THEN_NORM)


def rmsnorm_add_(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> None:
    """residual += rmsnorm(x) (in place)."""
    _launch(x, residual, w, eps, offset, None, NORM_THEN_ADD)


def rmsnorm_torch(x, w, eps, offset=0.0, out_dtype=None):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (w.float() + offset)
    return y.to(out_dtype or x.dtype)


def add_rmsnorm_torch_(x, residual, w, eps, offset=0.0, out_dtype=None):
    residual.copy_((residual.float() + x.float()).to(residual.dtype))
    return rmsnorm_torch(residual, w, eps, offset, out_dtype)


def rmsnorm_add_torch_(x, residual, w, eps, offset=0.0):
    residual.copy_((residual.float() + rmsnorm_torch(x, w, eps, offset, out_dtype=torch.float32)).to(residual.dtype))
