"""Weight-only int8 for the GPU decode step: each linear weight's rows as int8 with one fp32 scale per row.

    s[n] = max_k |W[n, k]| / 127        q[n, k] = round(W[n, k] / s[n])  in [-127, 127]        W ~ q * s

A batch-1 decode step reads every weight once, so halving the bytes of the linear weights is the one change that
moves the memory-bandwidth limit itself (norms, the embedding row and the KV cache stay in the model's dtype).

Prefill and decode must compute with the same weights, or the KV cache a prefill leaves would not be the one the
decode step would have made. `quantize_linears_` therefore also makes the model's own weights q * s (in the model's
dtype), so the Hugging Face model (prefill, parity's calibration) and the int8 kernels see one set of weights; what
differs is only where the product q * s is rounded. With `lean=True` the dense weights are dropped: each linear
module's `weight` is then q * s computed on access from the int8 rows it holds (`torch.nn.utils.parametrize`), so
the model holds one int8 copy and HF code that reads `module.weight` still works. A head tied to the input embedding
keeps its dense weight (the embedding rows are looked up from it), written as q * s.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

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


def quantize_linears_(model, lean: bool = False) -> dict[torch.nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize every linear weight of `model` to int8 rows and return {module: (q, s)} on the weights' device; the
    model's weights become q * s: written in place, or, with `lean`, computed on access from (q, s), the dense weight
    freed. A head tied to the input embedding is quantized once and stays dense (as q * s), so the embedding rows a
    step looks up are the dequantized ones too (prefill and decode agree)."""
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out = {}
    with torch.no_grad():
        for module in linear_modules(model):
            q, s = quantize_rows(module.weight)
            out[module] = (q, s)
            if lean and module.weight.data_ptr() not in embeddings:
                module.weight.requires_grad_(False)  # parametrize keeps int8 rows only as parameters that need none
                parametrize.register_parametrization(module, "weight", _Dequantized(q, s, module.weight.dtype),
                                                     unsafe=True)
                module.parametrizations.weight[0].pending = None
                out[module] = _originals(module)
            else:
                module.weight.copy_(dequantize_rows(q, s, module.weight.dtype))
    return out


class _Dequantized(torch.nn.Module):
    """A parametrization: the weight as q * s in `dtype`, from the int8 rows and row scales it is registered with."""

    def __init__(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.pending, self.dtype = (q, s), dtype

    def forward(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(q, s, self.dtype)

    def right_inverse(self, weight: torch.Tensor):  # registration: the stored tensors are (q, s), not the weight
        return self.pending


def _originals(module) -> tuple[torch.Tensor, torch.Tensor]:
    p = module.parametrizations.weight
    return p.original0.data, p.original1.data


def rebind_(int8: dict, module, q: torch.Tensor, s: torch.Tensor) -> None:
    """Make `module`'s int8 rows (q, s), e.g. views into a concatenation, in `int8` and, where the module's weight
    is computed from its own copy (`lean`), there too, so that one copy is kept."""
    int8[module] = (q, s)
    if parametrize.is_parametrized(module, "weight"):
        p = module.parametrizations.weight
        p.original0.data, p.original1.data = q, s


def nbytes(pairs) -> int:
    """Bytes of int8 weights and their scales."""
    return sum(q.numel() * q.element_size() + s.numel() * s.element_size() for q, s in pairs)
