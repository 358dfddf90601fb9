"""Gated activations: SwiGLU y = silu(g) * u (Llama, Qwen3, Mistral) and GeGLU y = gelu_tanh(g) * u (Gemma)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(z) = 2 sigmoid(2z) - 1
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 * tl.sigmoid(2.0 * z))


@triton.jit
def apply_act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    else:
        return _gelu_tanh(g)


@triton.jit
def _gated_kernel(g_ptr, u_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (apply_act(g, ACT) * u).to(y_ptr.dtype.element_ty), mask=mask)


def gated(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    _gated_kernel[(triton.cdiv(n, 1024),)](gate, up, y, n, ACT=ACTIVATIONS[act], BLOCK=1024)
    return y


def gated_torch(gate, up, act="silu"):
    g = gate.float()
    a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return (a * up.float()).to(gate.dtype)
