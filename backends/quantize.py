"""Weight-only int8 for the GPU decode step: each linear weight's rows as int8 with one fp32 scale per row.

    s[n] = max_k |W[n, k]| / 127        q[n, k] = round(W[n, k] / s[n])  in [-127, 127]        W ~ q * s

A batch-1 decode step reads every weight once, so halving the bytes of the linear weights is the one change that
moves the memory-bandwidth limit itself (norms, the embedding row and the KV cache stay in the model's dtype).

Prefill and decode must compute with the same weights, or the KV cache a prefill leaves would not be the one the
decode step would have made. `quantize_linears_` therefore also writes q * s back into the model's own weights (in
the model's dtype), so the Hugging Face model (prefill, the batch > 1 path, parity's calibration) and the int8 GEMV
kernels see one set of weights; what differs is only where the product q * s is rounded.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], s fp32 [N]); a row of zeros gets scale 1 (and stays zeros)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_rows needs a matrix, got shape {tuple(w.shape)}")
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w32 / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def linear_modules(model) -> list[torch.nn.Linear]:
    """The linear layers a decode step streams: every `nn.Linear` of the model (projections, MLP, the head), each
    weight once (a head tied to the embedding is one tensor)."""
    seen, out = set(), []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            out.append(module)
    return out


def quantize_linears_(model) -> dict[torch.nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize every linear weight of `model` to int8 rows, write q * s back into the weight in place, and return
    {module: (q, s)} on the weights' device. A head tied to the input embedding is quantized once, so the embedding
    rows a step looks up are the dequantized ones too (prefill and decode agree)."""
    out = {}
    with torch.no_grad():
        for module in linear_modules(model):
            q, s = quantize_rows(module.weight)
            module.weight.copy_(dequantize_rows(q, s, module.weight.dtype))
            out[module] = (q, s)
    return out


def nbytes(pairs) -> int:
    """Bytes of int8 weights and their scales."""
    return sum(q.numel() * q.element_size() + s.numel() * s.element_size() for q, s in pairs)
